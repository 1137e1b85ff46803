"""Structured outputs against a real server: the `openai` client with response_format and the
`regex` extension, native /generate streaming under `regex` and `json_schema`, malformed
grammars answered with 400 (and the server serving on), and the grammar cache.

The model has random weights: whatever it prefers, the grammar must hold, so every output
is checked by an independent checker (`re.fullmatch`, `json.loads` + `jsonschema`)."""

import concurrent.futures
import json
import re

import jsonschema
import openai
import pytest

from tests.server_harness import assert_idle_accounting, http, server  # noqa: F401 (fixtures)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "member"],
    "additionalProperties": False,
}
CODE = r"[A-Z][a-z]{2,8} (yes|no) [0-9]{1,3}"
GREEDY = {"temperature": 0, "max_new_tokens": 120}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def sse_events(http, body) -> list:
    """Every `data:` payload of a streamed /generate."""
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        raw = r.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    return [json.loads(b[len("data: "):]) for b in blocks[:-2]]


# ---- the openai client ----

@pytest.mark.parametrize("question", ["Describe a person.", "Give me JSON."])
def test_chat_json_schema(client, question):
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert 0 < out.usage.completion_tokens < 200


def test_chat_json_object(client):
    # A bare {"type": "object"} lets a random model write a key forever: this prompt's greedy
    # output happens to close (a short object), sampled ones may run out of tokens.
    done = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Describe a person."}],
                                          max_tokens=200, temperature=0, response_format={"type": "json_object"})
    assert done.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(done.choices[0].message.content), dict)
    # Sampled (seeded) with n=3: each choice that completes is an object, and those that run out of tokens are cut.
    sampled = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                             max_tokens=64, temperature=1.0, seed=3, n=3,
                                             response_format={"type": "json_object"})
    for choice in sampled.choices:
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length"


def test_completions_regex_and_response_format(client):
    for prompt in ["The answer:", "Code"]:
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, temperature=0,
                                        extra_body={"regex": CODE})
        assert out.choices[0].finish_reason == "stop"
        assert re.fullmatch(CODE, out.choices[0].text), out.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Code", max_tokens=60, temperature=0, extra_body={"regex": CODE}, stream=True))
    assert streamed == out.choices[0].text
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    out = client.completions.create(model="tiny", prompt="Person:", max_tokens=200, temperature=0,
                                    extra_body={"response_format": fmt})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].text), PERSON)


# ---- native /generate ----

def _check_stream(http, sampling: dict, prompt: str) -> dict:
    events = sse_events(http, {"text": prompt, "sampling_params": {**GREEDY, **sampling}})
    texts = [e["text"] for e in events]
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before), (before, after)  # cumulative, never takes text back
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    last = events[-1]
    assert last["meta_info"]["finish_reason"]["type"] == "stop", last
    full = http.post("/generate", json={"text": prompt, "sampling_params": {**GREEDY, **sampling}}).json()
    assert full["text"] == last["text"]
    return last


@pytest.mark.parametrize("prompt", ["Serial:", "Tell me"])
def test_native_stream_regex(http, prompt):
    last = _check_stream(http, {"regex": CODE}, prompt)
    assert re.fullmatch(CODE, last["text"]), last["text"]


@pytest.mark.parametrize("as_string", [True, False])
def test_native_stream_json_schema(http, as_string):
    schema = json.dumps(PERSON) if as_string else PERSON
    last = _check_stream(http, {"json_schema": schema}, "A person as JSON:")
    jsonschema.validate(json.loads(last["text"]), PERSON)
    meta = last["meta_info"]
    assert 0 < meta["forced_tokens"] < meta["completion_tokens"]  # the keys are forced (jump-forward)
    assert len(last["output_ids"]) == meta["completion_tokens"]


def test_native_choice_and_ebnf(http):
    choices = ["red", "green", "dark blue"]
    out = http.post("/generate", json={"text": ["Colour:", "Pick one"],
                                       "sampling_params": {**GREEDY, "choice": choices}}).json()
    assert all(o["text"] in choices and o["meta_info"]["finish_reason"]["type"] == "stop" for o in out), out
    grammar = 'root ::= num " + " num " = " num\nnum ::= [0-9] | [1-9] [0-9]'
    out = http.post("/generate", json={"text": "Sum:", "sampling_params": {**GREEDY, "ebnf": grammar}}).json()
    assert re.fullmatch(r"(?:[0-9]|[1-9][0-9]) \+ (?:[0-9]|[1-9][0-9]) = (?:[0-9]|[1-9][0-9])", out["text"]), out


def test_free_request_unchanged_beside_constrained(http):
    body = {"text": "The weather today", "sampling_params": {"temperature": 0, "max_new_tokens": 16}}
    alone = http.post("/generate", json=body).json()
    constrained = {"text": "Serial:", "sampling_params": {**GREEDY, "regex": CODE}}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(http.post, "/generate", json=constrained) for _ in range(3)]
        beside = pool.submit(http.post, "/generate", json=body).result().json()
        assert all(re.fullmatch(CODE, f.result().json()["text"]) for f in futures)
    assert beside["output_ids"] == alone["output_ids"]  # all-ones mask rows: sampling untouched


def test_constrained_requests_compile_nothing(http):
    # The total the engine counts since its warm-up, after this module's constrained requests
    # (a grammar bitmask placed unlike the warm-up's all-ones mask would compile the sampler again).
    assert http.get("/get_server_info").json()["compilations_after_warmup"] == 0


# ---- malformed grammars: 400 naming the field ----

NATIVE_BAD = {
    "regex-open-group": ({"regex": "("}, "regex"),
    "regex-open-class": ({"regex": "[a-"}, "regex"),
    "regex-not-string": ({"regex": 123}, "regex"),
    "ebnf-unbalanced": ({"ebnf": 'root ::= "a" ( "b"'}, "ebnf"),
    "ebnf-undefined-rule": ({"ebnf": "root ::= value\nitem ::= [a-z]+"}, "ebnf"),
    "json-schema-not-json": ({"json_schema": "{type: object"}, "json_schema"),
    "json-schema-array": ({"json_schema": "[1, 2]"}, "json_schema"),
    "json-schema-unsupported": ({"json_schema": {"not": {"type": "string"}}}, "json_schema"),
    "json-schema-bad-type": ({"json_schema": {"type": "object", "properties": {"a": {"type": "foo"}}}}, "json_schema"),
    "choice-not-list": ({"choice": "red"}, "choice"),
    "choice-empty": ({"choice": []}, "choice"),
    "two-fields": ({"regex": "[a-z]+", "json_schema": {"type": "string"}}, "regex"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", list(NATIVE_BAD), ids=list(NATIVE_BAD))
def test_native_malformed_is_400(http, case, stream):
    sampling, field = NATIVE_BAD[case]
    r = http.post("/generate", json={"text": "hi", "stream": stream, "sampling_params": {"max_new_tokens": 4, **sampling}})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert field in message, message
    if case == "two-fields":
        assert "json_schema" in message


def test_openai_malformed_is_400(client):
    messages = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
         "json_schema"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}),
         "json_schema"),
        (dict(response_format={"type": "json_schema"}), "response_format"),
        (dict(extra_body={"regex": "[a-"}), "regex"),
        (dict(extra_body={"ebnf": "root ::= missing"}), "ebnf"),
    ]
    for kwargs, field in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, **kwargs)
        assert info.value.status_code == 400
        assert field in info.value.message, (kwargs, info.value.message)
        assert "sampling_params" not in info.value.message  # OpenAI's names, not SGLang's
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="hi", max_tokens=4, extra_body={"regex": "("})
    assert "regex" in info.value.message


def test_openai_two_constraints_message(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       extra_body={"regex": "[a-z]", "ebnf": 'root ::= "a"'})
    assert "regex" in info.value.message and "ebnf" in info.value.message
    assert "sampling_params" not in info.value.message


def test_still_serving_after_errors(http, client):
    assert http.get("/health").status_code == 200
    out = http.post("/generate", json={"text": "The sky is", "sampling_params": {"max_new_tokens": 6, "temperature": 0}})
    assert out.status_code == 200 and out.json()["meta_info"]["completion_tokens"] == 6
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].finish_reason == "length"
    out = http.post("/generate", json={"text": "Serial:", "sampling_params": {**GREEDY, "regex": CODE}}).json()
    assert re.fullmatch(CODE, out["text"])
    assert_idle_accounting(http)


# ---- the grammar cache ----

def test_repeated_schema_compiles_once(http):
    schema = {"type": "object", "properties": {"cache_probe_field": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["cache_probe_field"], "additionalProperties": False}  # unique to this test
    before = http.get("/get_server_info").json()
    body = {"text": "Probe:", "sampling_params": {**GREEDY, "json_schema": json.dumps(schema)}}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two arrive together, one after
        outs = [f.result() for f in [pool.submit(http.post, "/generate", json=body) for _ in range(2)]]
    outs.append(http.post("/generate", json=body))
    for r in outs:
        assert r.status_code == 200
        jsonschema.validate(json.loads(r.json()["text"]), schema)
    after = http.get("/get_server_info").json()
    assert after["grammar_cache_misses"] - before["grammar_cache_misses"] == 1
    assert after["grammar_cache_hits"] - before["grammar_cache_hits"] == 2
    assert after["grammar_cache_size"] >= 1
