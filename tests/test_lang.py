"""The frontend language (`jaxserve.lang`) on SmolLM2, on both backends: the in-process
engine and `RuntimeEndpoint` over a real HTTP server of the same engine. References are
independent: the tokenizer's chat template, scoring from `/generate` input logprobs with our
own tokenization, programs run one by one, `jsonschema`."""

import json
import math

import httpx
import jsonschema
import pytest

import jaxserve.lang as sgl
from jaxserve.server import ServerThread
from tests.lang_examples import CHARACTER_SCHEMA, load_examples

GREEDY = dict(temperature=0)


@pytest.fixture(scope="module")
def engine(smollm2_engine):
    return smollm2_engine  # shared by the modules on the real model (conftest.py)


@pytest.fixture(scope="module")
def server(engine):
    s = ServerThread(engine)
    yield s
    s.stop()


@pytest.fixture(scope="module", params=["engine", "http"])
def backend(request, engine, server):
    b = sgl.EngineBackend(engine) if request.param == "engine" else sgl.RuntimeEndpoint(server.url)
    sgl.set_default_backend(b)
    yield b
    sgl.set_default_backend(None)


@sgl.function
def chat(s, question, follow_up):
    s += sgl.system("You answer in one short sentence.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("first", max_tokens=16, **GREEDY))
    with s.user():
        s += follow_up
    s += sgl.assistant_begin()
    s += sgl.gen("second", max_tokens=12, **GREEDY)
    s += sgl.assistant_end()


def test_multi_turn_chat_is_the_chat_template_rendering(backend, engine):
    state = chat.run(question="What is the capital of France?", follow_up="And of Italy?")
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == state["first"] and messages[4]["content"] == state["second"]
    assert state.text() == engine.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert "Paris" in state["first"]
    # Each gen is the engine's greedy continuation of the text before it.
    prompt = engine.tokenizer.apply_chat_template(messages[:3] + messages[3:4], add_generation_prompt=True)
    assert engine.generate(prompt, {"max_new_tokens": 12, **GREEDY})["text"] == state["second"]
    meta = state.get_meta_info("second")
    assert meta["cached_tokens"] > 0 and meta["completion_tokens"] <= 12


@sgl.function
def branches(s, topic):
    s += "Here are three short facts about " + topic + ".\n"
    forks = s.fork(3)
    forks += lambda i: f"Fact {i + 1}:" + sgl.gen("fact", max_tokens=8, stop="\n", **GREEDY)
    forks.join()
    with s.copy() as c:
        c += "Summary:" + sgl.gen("summary", max_tokens=6, **GREEDY)
    s += "Done."


def test_fork_branches_share_the_prefix_and_join_gathers_them(backend):
    state = branches.run(topic="the Moon " * 12)
    facts = state["fact"]
    assert isinstance(facts, list) and len(facts) == 3
    assert state.text().endswith("Done.") and "Fact" not in state.text()
    forks = None

    @sgl.function
    def fork_meta(s):
        nonlocal forks
        s += "A long shared prefix about rivers and lakes. " * 6
        forks = s.fork(3)
        forks += [f"Question {i}: name a river." + sgl.gen("r", max_tokens=4, **GREEDY) for i in range(3)]
        forks.join(mode="concate_and_append")

    state = fork_meta.run()
    prefix_tokens = [f.get_meta_info("r")["cached_tokens"] for f in forks]
    assert all(t > 0 for t in prefix_tokens), prefix_tokens
    for i, f in enumerate(forks):
        assert f"Question {i}: name a river." + f["r"] in state.text()


def reference_choice(engine, prefix, choices):
    """Mean logprob of each choice's own tokens (ours: where its tokens leave the prefix's)."""
    tok = engine.tokenizer
    base = tok.encode(prefix)
    scores = []
    for choice in choices:
        ids = tok.encode(prefix + choice)
        k = next((i for i, (a, b) in enumerate(zip(base, ids)) if a != b), min(len(base), len(ids) - 1))
        out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                              logprob_start_len=0)
        values = [e[0] for e in out["meta_info"]["input_token_logprobs"][k:] if e[0] is not None]
        scores.append(sum(values) / len(values))
    return choices[max(range(len(choices)), key=scores.__getitem__)], scores


@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection",
                                    "unconditional_likelihood_normalized"])
def test_select_picks_what_independent_scoring_picks(backend, engine, method):
    choices = [" Paris", " London", " the city of Berlin", " Rome"]
    prefix = ("Q: What is the capital of Germany?\nA: The capital of Germany is Berlin.\n"
              "Q: What is the capital of Spain?\nA: The capital of Spain is Madrid.\n"
              "Q: What is the capital of France?\nA: The capital of France is")

    @sgl.function
    def pick(s):
        s += prefix + sgl.select("city", choices=choices, choices_method=getattr(sgl, method))

    state = pick.run()
    meta = state.get_meta_info("city")
    expected, scores = reference_choice(engine, prefix, choices)
    assert meta["normalized_prompt_logprobs"] == pytest.approx(scores, abs=2e-3)
    if method == "token_length_normalized":
        assert state["city"] == expected == " Paris"
    elif method == "unconditional_likelihood_normalized":
        alone = [engine.generate(input_ids=[e[1] for e in entries], sampling_params={"max_new_tokens": 0},
                                 return_logprob=True, logprob_start_len=0)["meta_info"]["input_token_logprobs"]
                 for entries in meta["input_token_logprobs"]]
        conditional = [[e[0] for e in entries] for entries in meta["input_token_logprobs"]]
        unconditional = [[e[0] or 0.0 for e in entries] for entries in alone]
        score = [sum(c - u for c, u in zip(cs, us)) / len(cs) for cs, us in zip(conditional, unconditional)]
        assert state["city"] == choices[max(range(len(choices)), key=score.__getitem__)]
    else:
        first = [entries[0][0] for entries in meta["input_token_logprobs"]]
        assert state["city"] == choices[first.index(max(first))]
    assert state.text() == prefix + state["city"]
    assert all(c > 0 for c in meta["cached_tokens"])  # the prefix was prefilled first


@sgl.function
def short_answer(s, question):
    s += "Question: " + question + "\nAnswer:"
    s += sgl.gen("answer", max_tokens=6, stop="\n", **GREEDY)


QUESTIONS = [f"What is {a} plus {b}?" for a in range(4) for b in range(8)]


@pytest.fixture(scope="module")
def one_by_one(engine):
    backend = sgl.EngineBackend(engine)
    return [short_answer.run(question=q, backend=backend)["answer"] for q in QUESTIONS]


def test_run_batch_of_32_equals_one_by_one(backend, one_by_one):
    states = short_answer.run_batch([{"question": q} for q in QUESTIONS], progress_bar=True, num_threads=32)
    assert [s["answer"] for s in states] == one_by_one
    assert all(s.error() is None for s in states)


def test_typed_and_constrained_gens(backend):
    @sgl.function
    def typed(s):
        s += "Q: How many legs does a cat have?\nA: " + sgl.gen("legs", dtype=int, max_tokens=4)
        s += "\nQ: Is water wet? Answer True or False.\nA: " + sgl.gen("wet", dtype=bool)
        s += "\nQ: A character as JSON.\nA: " + sgl.gen("json", json_schema=CHARACTER_SCHEMA, max_tokens=64)
        s += "\nQ: A date.\nA: " + sgl.gen("date", regex=r"20[0-9]{2}-[01][0-9]-[0-3][0-9]")

    state = typed.run(temperature=0)
    assert isinstance(state["legs"], int) and isinstance(state["wet"], bool)
    jsonschema.validate(json.loads(state["json"]), json.loads(CHARACTER_SCHEMA))
    assert len(state["date"]) == 10 and state["date"].startswith("20")


def test_streaming_text_iter_yields_growing_text(backend):
    state = chat.run(question="Name a colour.", follow_up="Another one?", stream=True)
    pieces = list(state.text_iter())
    assert len(pieces) > 5 and all(pieces)
    final = state.text()
    assert "".join(pieces) == final
    assert "".join(state.text_iter("second")) == state["second"]
    batch = chat.run(question="Name a colour.", follow_up="Another one?")
    assert batch.text() == final  # greedy: streaming does not change the result


def test_a_failing_gen_names_itself_and_spares_the_batch(backend):
    @sgl.function
    def bad(s, n):
        s += "Count: " + sgl.gen("ok", max_tokens=2, **GREEDY)
        s += sgl.gen("broken", max_tokens=2, top_p=2.0 if n == 1 else 1.0, **GREEDY)

    with pytest.raises(sgl.ProgramError, match=r"gen\('broken'\) failed.*top_p"):
        bad.run(n=1)
    states = bad.run_batch([{"n": i} for i in range(3)])
    assert isinstance(states[1].error(), sgl.ProgramError)
    assert states[0].error() is None and states[2].error() is None and states[2]["broken"] is not None
    with pytest.raises(sgl.ProgramError):
        states[1]["broken"]


def test_var_scope_and_meta_info(backend):
    @sgl.function
    def scoped(s):
        with s.var_scope("intro"):
            s += "Hello, " + sgl.gen("name", max_tokens=3, **GREEDY)
        s += "!"

    state = scoped.run()
    assert state["intro"] == "Hello, " + state["name"] and state.text() == state["intro"] + "!"
    meta = state.get_meta_info("name")
    assert meta["prompt_tokens"] > 0 and meta["finish_reason"]["type"] in ("length", "stop")


def test_sglang_examples_run_with_only_the_import_changed(backend):
    ex = load_examples("jaxserve.lang")
    state = ex.few_shot_qa.run(question="What is the capital of Spain?")
    assert state["answer"].strip() == "Madrid"
    state = ex.multi_turn_question.run(question_1="What is the capital of France?", question_2="And of Italy?")
    assert "Paris" in state["answer_1"]
    state = ex.tip_suggestion.run()
    assert len(state.text()) > 100 and state["summary"]
    state = ex.tool_use.run(question="What is 37 times 12")
    assert state["tool"] in ("calculator", "search engine")
    ip = ex.regex_gen.run()["answer"]
    assert all(0 <= int(part) <= 255 for part in ip.split(".")) and ip.count(".") == 3
    character = json.loads(ex.character_gen.run(name="Hermione Granger")["json_output"])
    jsonschema.validate(character, json.loads(CHARACTER_SCHEMA))
    assert not math.isnan(len(character["name"]))


def test_openai_backend_runs_gen_only_programs(engine, server):
    """`sgl.OpenAI` over our `/v1/completions`: the same greedy text as the in-process backend."""
    ex = load_examples("jaxserve.lang")
    model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    oa = sgl.OpenAI(model, base_url=server.url + "/v1",
                    chat_template=sgl.EngineBackend(engine).chat_template)
    local = sgl.EngineBackend(engine)
    kwargs = dict(question_1="What is the capital of France?", question_2="And of Italy?")
    remote = ex.multi_turn_question.run(**kwargs, backend=oa)
    assert remote.text() == ex.multi_turn_question.run(**kwargs, backend=local).text()
    assert remote.get_meta_info("answer_2")["cached_tokens"] > 0
    streamed = ex.few_shot_qa.run(question="What is the capital of Spain?", backend=oa, stream=True)
    assert "".join(streamed.text_iter("answer")) == streamed["answer"] == " Madrid"
    jsonschema.validate(json.loads(ex.character_gen.run(name="Ron Weasley", backend=oa)["json_output"]),
                        json.loads(CHARACTER_SCHEMA))
    with pytest.raises(sgl.ProgramError, match=r"select\('tool'.*OpenAI API"):
        ex.tool_use.run(question="What is 3 times 4", backend=oa)


def test_gen_arguments_reach_the_server_as_sglang_sends_them(backend, engine):
    """Each gen equals a direct `/generate` of the same text with SGLang's field names."""
    cases = [
        (dict(max_tokens=6, min_tokens=4, stop=["."], temperature=0), {"max_new_tokens": 6, "min_new_tokens": 4,
                                                                       "stop": ["."], "temperature": 0}),
        (dict(max_tokens=6, stop_regex=r"[0-9]", top_k=5, min_p=0.1, temperature=0),
         {"max_new_tokens": 6, "stop_regex": r"[0-9]", "top_k": 5, "min_p": 0.1, "temperature": 0}),
        (dict(max_tokens=5, frequency_penalty=1.5, presence_penalty=0.5, ignore_eos=True, temperature=0),
         {"max_new_tokens": 5, "frequency_penalty": 1.5, "presence_penalty": 0.5, "ignore_eos": True,
          "temperature": 0}),
    ]
    prompt = "List three animals and their numbers of legs:"
    for gen_args, sampling in cases:
        @sgl.function
        def one(s):
            s += prompt + sgl.gen("out", **gen_args)
        assert one.run()["out"] == engine.generate(prompt, sampling)["text"], gen_args

    @sgl.function
    def detailed(s):
        s += prompt + sgl.gen("pair", n=2, max_tokens=4, temperature=0)
        s += sgl.gen("lp", max_tokens=3, temperature=0, return_logprob=True, top_logprobs_num=2,
                     return_text_in_logprobs=True, logprob_start_len=0)
        s += " Weight: " + sgl.gen("w", dtype=float, max_tokens=6) + " Name: " + sgl.gen_string("name", max_tokens=12)

    state = detailed.run(temperature=0)
    assert isinstance(state["pair"], list) and len(state["pair"]) == 2 and state["pair"][0] == state["pair"][1]
    meta = state.get_meta_info("lp")
    assert len(meta["output_token_logprobs"]) == 3 and all(len(t) == 2 for t in meta["output_top_logprobs"])
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert isinstance(state["w"], float) and isinstance(state["name"], str)
    assert state.text().endswith(f'Name: "{state["name"]}"')


def test_run_batch_prefills_the_traced_prefix(backend, engine):
    few_shot = "".join(f"Q: What is {i} plus {i}?\nA: {2 * i}\n" for i in range(1, 9))

    @sgl.function
    def adder(s, a, b):
        s += few_shot
        s += f"Q: What is {a} plus {b}?\nA:" + sgl.gen("sum", max_tokens=3, stop="\n", temperature=0)

    assert adder.cache() == few_shot + "Q: What is "  # the text before the first argument's value
    sgl.flush_cache()
    states = adder.run_batch([(a, b) for a in range(3) for b in range(2)])
    prefix_tokens = len(engine.tokenizer.encode(few_shot))
    assert all(s.get_meta_info("sum")["cached_tokens"] >= prefix_tokens // 16 * 16 for s in states)
    assert all(s.error() is None and s.text().startswith(few_shot + "Q: What is ") for s in states)


def test_chat_template_from_jinja_with_fallback():
    """No engine: role text comes from the template; a template that refuses falls back."""
    source = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
              "[{{ m['role'] }}]{{ m['content'] }}[/]{% endfor %}")
    fallback = sgl.FixedChatTemplate("x", {"system": ("<s>", "</s>")})
    template = sgl.JinjaChatTemplate(source, fallback=fallback)
    assert template.prefix_and_suffix("user", []) == ("[user]", "[/]")
    assert template.prefix_and_suffix("assistant", [{"role": "user", "content": "hi"}]) == ("[assistant]", "[/]")
    assert template.prefix_and_suffix("system", []) == ("<s>", "</s>")
    with pytest.raises(ValueError, match="no role 'tool'"):
        fallback.prefix_and_suffix("tool", [])
