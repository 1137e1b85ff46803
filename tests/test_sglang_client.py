"""SGLang's own frontend client (`sglang.RuntimeEndpoint`, PyPI `sglang==0.5.23`, installed
with `--no-deps` by `make test`) drives a real jaxserve server unchanged: gen, streaming,
select with each choices method, fork / join, run_batch, constrained gen, flush_cache,
server_info and chat roles. Each result is checked against an independent reference: the
same request sent with httpx, or a score computed here from `/generate` logprobs.

How the client is imported: `import sglang` runs the package's `__init__`, which also
imports the server half (`sglang.srt`: torch, triton and the rest of the GPU stack; triton
alone is a GPU compiler we do not install). The frontend itself (`sglang.lang`) is built to
run without the server half, so `load_sglang_frontend` registers a bare `sglang` package
whose `__init__` is skipped and imports the frontend modules from the installed package;
the returned module exposes the same public names (`sgl.function`, `sgl.gen`,
`sgl.RuntimeEndpoint`, ...) that the real top-level package re-exports. Where the real
`sglang` package is already imported, it is used as it is."""

from __future__ import annotations

import asyncio
import importlib
import importlib.machinery
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from tests.server_harness import assert_idle_accounting, http, server  # noqa: F401 (fixtures, with API_KEY)

API_KEY = "sglang-client-key"  # the harness server requires it, and the client sends it
PREFIX = "Shared context that every branch of the program reads before going its own way. " * 3


def load_sglang_frontend() -> types.ModuleType:
    """`sglang`'s public frontend API without running the package `__init__` (see above)."""
    if "sglang" in sys.modules and hasattr(sys.modules["sglang"], "RuntimeEndpoint"):
        return sys.modules["sglang"]
    spec = importlib.util.find_spec("sglang")
    if spec is None:
        pytest.skip("sglang is not installed (make install-test installs it)", allow_module_level=True)
    package = types.ModuleType("sglang")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = importlib.machinery.ModuleSpec("sglang", None, is_package=True)
    package.__spec__.submodule_search_locations = package.__path__
    sys.modules["sglang"] = package
    for name in ("sglang.lang.api", "sglang.lang.choices", "sglang.lang.backend.runtime_endpoint"):
        module = importlib.import_module(name)
        package.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    package.__version__ = importlib.import_module("sglang.version").__version__
    return package


sgl = load_sglang_frontend()


@pytest.fixture(scope="module")
def backend(server):
    endpoint = sgl.RuntimeEndpoint(server.url, api_key=API_KEY)
    sgl.set_default_backend(endpoint)
    yield endpoint
    sgl.global_config.default_backend = None


def generate(http, text, **sampling) -> dict:
    """A greedy /generate sent directly: the reference for what the client gets."""
    r = http.post("/generate", json={"text": text, "sampling_params": {"temperature": 0, **sampling}})
    assert r.status_code == 200, r.text
    return r.json()


def ok(state):
    """The client turns a failed request into a warning and `state.error()`: fail on that."""
    assert state.error() is None, state.error()
    return state


@sgl.function
def complete(s, prompt, max_tokens=8):
    s += prompt + sgl.gen("out", max_tokens=max_tokens, temperature=0)


def test_version_and_model_info(backend):
    assert sgl.__version__ == "0.5.23"
    assert isinstance(backend.get_model_name(), str)


def test_gen_plain_stop_and_max_tokens(backend, http):
    state = ok(complete.run(prompt="The sky is"))
    ref = generate(http, "The sky is", max_new_tokens=8)
    assert state["out"] == ref["text"] and state.text() == "The sky is" + ref["text"]
    meta = state.get_meta_info("out")
    assert meta["completion_tokens"] == 8 and meta["finish_reason"]["type"] == "length"

    full = generate(http, "Count:", max_new_tokens=16)["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]

    @sgl.function
    def stopped(s):
        s += "Count:" + sgl.gen("out", max_tokens=16, stop=stop, temperature=0)

    state = ok(stopped.run())
    assert state["out"] == full[: full.find(stop)]
    assert state.get_meta_info("out")["finish_reason"]["matched"] == stop

    @sgl.function
    def regex_stopped(s):
        s += "Count:" + sgl.gen("out", max_tokens=16, stop_regex=r"[aeiou][a-z]", min_tokens=2, temperature=0)

    ref = generate(http, "Count:", max_new_tokens=16, stop_regex=r"[aeiou][a-z]", min_new_tokens=2)
    assert ok(regex_stopped.run())["out"] == ref["text"]


def test_stream_text_iter_and_incremental_logprobs(backend, http):
    whole = ok(complete.run(prompt="Streaming works", max_tokens=12))
    streamed = complete.run(prompt="Streaming works", max_tokens=12, stream=True)
    assert "".join(streamed.text_iter()) == whole.text() and ok(streamed)
    streamed = complete.run(prompt="Streaming works", max_tokens=12, stream=True)
    assert "".join(streamed.text_iter("out")) == whole["out"] and ok(streamed)

    @sgl.function
    def with_logprobs(s):
        s += "Streaming works" + sgl.gen("out", max_tokens=12, temperature=0, return_logprob=True)

    async def chunks():
        state = with_logprobs.run(stream=True)
        return state, [chunk async for chunk in state.text_async_iter("out", return_meta_data=True)]

    state, pieces = asyncio.run(chunks())
    assert "".join(text for text, _ in pieces) == ok(state)["out"] == whole["out"]
    reference = http.post("/generate", json={"text": "Streaming works", "return_logprob": True,
                                             "sampling_params": {"temperature": 0, "max_new_tokens": 12}}).json()
    expected = reference["meta_info"]["output_token_logprobs"]
    previous = 0
    for text, meta in pieces:
        # Only this chunk's entries: the stream is incremental. The client keeps the meta of the
        # last event it read, so when two events arrive before it wakes, the earlier one's entries
        # are its loss (each server event's entries are checked in test_server_native.py).
        new, done = meta["output_token_logprobs"], meta["completion_tokens"]
        assert text and meta["output_token_logprobs_length"] == done
        assert 1 <= len(new) <= done - previous
        assert [e[1] for e in new] == reference["output_ids"][done - len(new):done]
        np.testing.assert_allclose([e[0] for e in new], [e[0] for e in expected[done - len(new):done]],
                                   rtol=1e-4, atol=1e-5)
        previous = done
    assert previous == len(reference["output_ids"])


def own_choice_scores(http, prefix: str, choices: list[str]) -> tuple[list[float], list[list[float]], list[float]]:
    """Scores of `choices` after `prefix`, computed here from /generate input logprobs: the
    mean logprob of each candidate's tokens (with the prefix's last token, which the client's
    token healing keeps unless its text ends the prefix), the per-token logprobs, and the mean
    of conditional minus unconditional logprobs (the candidate's tokens scored on their own)."""
    prompt_len = http.post("/generate", json={"text": prefix, "sampling_params": {"max_new_tokens": 0}}).json()
    start = max(prompt_len["meta_info"]["prompt_tokens"] - 2, 0)
    batch = http.post("/generate", json={"text": [prefix + c for c in choices], "return_logprob": True,
                                         "return_text_in_logprobs": True, "logprob_start_len": start,
                                         "sampling_params": {"max_new_tokens": 0, "temperature": 0}}).json()
    means, per_token, token_ids = [], [], []
    for out in batch:
        entries = out["meta_info"]["input_token_logprobs"]
        if prefix.endswith(entries[0][2]):
            entries = entries[1:]
        values = [lp for lp, _, _ in entries]
        means.append(sum(values) / len(values))
        per_token.append(values)
        token_ids.append([tid for _, tid, _ in entries])
    alone = http.post("/generate", json={"input_ids": token_ids, "return_logprob": True, "logprob_start_len": 0,
                                         "sampling_params": {"max_new_tokens": 0}}).json()
    unconditional = []
    for values, out in zip(per_token, alone):
        base = [lp or 0.0 for lp, _, _ in out["meta_info"]["input_token_logprobs"]]
        unconditional.append(float(np.mean(np.array(values) - np.array(base))))
    return means, per_token, unconditional


def greedy_pick(per_token: list[list[float]]) -> int:
    """Token by token, keep the candidates with the best logprob; shorter ones continue at their mean."""
    width = max(map(len, per_token))
    rows = [v + [float(np.mean(v))] * (width - len(v)) for v in per_token]
    alive = list(range(len(rows)))
    for j in range(width):
        best = max(rows[i][j] for i in alive)
        alive = [i for i in alive if rows[i][j] == best]
        if len(alive) == 1:
            break
    return alive[0]


def test_prefill_only_logprobs_cover_the_input(http):
    """The client's unconditional scoring asks without `logprob_start_len` and reads from the first token."""
    body = {"input_ids": [[5, 6, 7, 8], [9, 10]], "return_logprob": True, "sampling_params": {"max_new_tokens": 0}}
    default = http.post("/generate", json=body).json()
    explicit = http.post("/generate", json={**body, "logprob_start_len": 0}).json()
    for got, ref in zip(default, explicit):
        assert got["meta_info"]["input_token_logprobs"] == ref["meta_info"]["input_token_logprobs"]
        assert got["meta_info"]["input_token_logprobs"][0][0] is None
        assert len(got["meta_info"]["input_token_logprobs"]) == got["meta_info"]["prompt_tokens"]
    generating = http.post("/generate", json={**body, "sampling_params": {"max_new_tokens": 1}}).json()
    assert all(out["meta_info"]["input_token_logprobs"] == [] for out in generating)  # -1 still: output only
    for echo in (False, True):  # OpenAI completions show prompt logprobs with echo only
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "one two three", "max_tokens": 0,
                                               "logprobs": 1, "echo": echo}).json()
        assert len(r["choices"][0]["logprobs"]["tokens"]) == (3 if echo else 0)


@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection",
                                    "unconditional_likelihood_normalized"])
def test_select_matches_own_scoring(backend, http, method):
    prefix, choices = "My favourite colour is", [" red", " green", " blue sky", " purple"]

    @sgl.function
    def pick(s):
        s += prefix + sgl.select("colour", choices=choices, choices_method=getattr(sgl, method))

    state = ok(pick.run())
    means, per_token, unconditional = own_choice_scores(http, prefix, choices)
    expected = {"token_length_normalized": int(np.argmax(means)), "greedy_token_selection": greedy_pick(per_token),
                "unconditional_likelihood_normalized": int(np.argmax(unconditional))}[method]
    assert state["colour"] == choices[expected]
    assert state.text() == prefix + choices[expected]
    np.testing.assert_allclose(state.get_meta_info("colour")["normalized_prompt_logprobs"], means, rtol=1e-5)


@sgl.function
def branches(s, join_mode=None):
    s += PREFIX
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Branch {i}:" + sgl.gen("tip", max_tokens=6, temperature=0)
    forks.join(**({"mode": join_mode} if join_mode else {}))  # the default mode gathers variables
    s += " Summary:" + sgl.gen("summary", max_tokens=6, temperature=0)


def test_fork_join_gathers_variables(backend, http):
    state = ok(branches.run())
    tips = [generate(http, PREFIX + f"Branch {i}:", max_new_tokens=6)["text"] for i in range(2)]
    assert state["tip"] == tips
    assert state["summary"] == generate(http, PREFIX + " Summary:", max_new_tokens=6)["text"]


def test_fork_branches_share_the_cached_prefix(backend):
    @sgl.function
    def forked(s):
        s += PREFIX + sgl.gen("intro", max_tokens=2, temperature=0)  # cached when it finishes
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f"Branch {i}:" + sgl.gen("tip", max_tokens=4, temperature=0)
        s["texts"] = [ok(f).text() for f in forks]
        s["cached"] = [f.get_meta_info("tip")["cached_tokens"] for f in forks]

    sgl.flush_cache()
    state = ok(forked.run())
    shared = PREFIX + state["intro"]
    assert all(text.startswith(shared + f"Branch {i}:") for i, text in enumerate(state["texts"]))
    assert all(cached > 0 for cached in state["cached"]), state["cached"]


def test_fork_join_concate_and_append(backend, http):
    state = ok(branches.run(join_mode="concate_and_append"))
    tips = [generate(http, PREFIX + f"Branch {i}:", max_new_tokens=6)["text"] for i in range(2)]
    joined = PREFIX + "".join(f"Branch {i}:{tip}" for i, tip in enumerate(tips))
    assert state.text() == joined + " Summary:" + state["summary"]
    assert state["summary"] == generate(http, joined + " Summary:", max_new_tokens=6)["text"]


@sgl.function
def answer(s, question):
    s += PREFIX + "Q: " + question + "\nA:" + sgl.gen("a", max_tokens=6, temperature=0)


def test_run_batch_equals_one_by_one(backend):
    questions = [{"question": q} for q in ("One?", "Two apples and what?", "Three little pigs?", "Four.")]
    sgl.flush_cache()
    batch = answer.run_batch(questions, num_threads=2, progress_bar=True)  # precaches the traced prefix first
    assert all(ok(s).get_meta_info("a")["cached_tokens"] > 0 for s in batch)
    assert [s.text() for s in batch] == [ok(answer.run(**args)).text() for args in questions]


def test_constrained_gen(backend):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}

    @sgl.function
    def constrained(s):
        s += "Number: " + sgl.gen("number", dtype=int, max_tokens=8, temperature=0)
        s += "\nCode: " + sgl.gen("code", regex=r"[A-Z]{2}-[0-9]{3}", max_tokens=10, temperature=0)
        s += "\nPerson: " + sgl.gen("person", json_schema=json.dumps(schema), max_tokens=48, temperature=0)

    state = ok(constrained.run())
    assert re.fullmatch(r"[-+]?[0-9]+", state["number"].strip()) and isinstance(int(state["number"]), int)
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", state["code"])
    jsonschema.validate(json.loads(state["person"]), schema)


def test_flush_cache_and_server_info(backend, http):
    ok(complete.run(prompt=PREFIX))
    assert http.get("/get_server_info").json()["evictable_pages"] > 0
    sgl.flush_cache()
    assert http.get("/get_server_info").json()["evictable_pages"] == 0
    info = sgl.get_server_info()
    assert info["context_length"] == 512 and info["page_size"] == 16
    assert set(info) == set(http.get("/server_info").json())
    assert_idle_accounting(http)


def test_roles_follow_the_chat_template(server, http):
    chat = sgl.RuntimeEndpoint(server.url, api_key=API_KEY, chat_template_name="chatml")

    @sgl.function
    def conversation(s):
        s += sgl.system("You are terse.")
        s += sgl.user("Name a colour.")
        s += sgl.assistant(sgl.gen("answer", max_tokens=6, temperature=0))

    state = ok(conversation.run(backend=chat))
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    prompt = server.app.state.server.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    reply = generate(http, prompt, max_new_tokens=6, stop=["<|im_end|>"])["text"]
    assert state["answer"] == reply
    assert state.text() == prompt + reply + "<|im_end|>\n"
    assert state.messages() == messages + [{"role": "assistant", "content": reply.lstrip()}]


def test_profile_routes(backend, http, tmp_path):
    """The client's start_profile / stop_profile (GET, no body) succeed; the trace of the
    requests in between is written into a new folder the server chose (a client's
    `output_dir` is refused: no route writes where a client says); out-of-order calls are 400s."""
    backend.start_profile()
    ok(complete.run(prompt="Profile me"))
    backend.stop_profile()
    refused = http.post("/start_profile", json={"output_dir": str(tmp_path)})
    assert refused.status_code == 400 and "output_dir" in refused.json()["error"]["message"]
    started = http.post("/start_profile").json()["output_dir"]
    assert http.post("/start_profile").status_code == 400  # already running
    generate(http, "Profile me too", max_new_tokens=2)
    assert http.post("/stop_profile").json()["success"] is True
    assert list(Path(started).rglob("*.xplane.pb")) and not list(tmp_path.iterdir())
    r = http.post("/stop_profile")
    assert r.status_code == 400 and "no profile is running" in r.json()["error"]["message"]
    assert http.post("/start_profile", json={"num_steps": 5}).status_code == 400
