"""Malformed requests get a 4xx JSON error that says what is wrong, and the server keeps
serving; `--api-key` guards every route but /health; a dead engine is a 503 everywhere."""

import time

import httpx
import openai
import pytest

from tests.server_harness import assert_idle_accounting, http, running_server, server  # noqa: F401 (fixtures)

API_KEY = "s3cret"  # the harness's `server` and `http` fixtures use it
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
GEN = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}

# (method, path, body: dict = JSON, bytes = raw, None = no body), expected status, message fragment
CASES = [
    ("POST", "/generate", b"{not json", 400, "not valid JSON"),
    ("POST", "/generate", b"\xff\xfe{}", 400, "not valid UTF-8"),
    ("POST", "/generate", b'{"text": NaN}', 400, "not valid JSON"),
    ("POST", "/generate", b"[1, 2]", 400, "must be a JSON object"),
    ("POST", "/generate", None, 400, "body is empty"),
    ("POST", "/generate", {**GEN, "foo": 1}, 400, "unknown field(s) ['foo']"),
    ("POST", "/generate", {"sampling_params": {}}, 400, "exactly one of `text`"),
    ("POST", "/generate", {"text": 42}, 400, "`text` must be a string"),
    ("POST", "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": "ten"}}, 400,
     "max_new_tokens must be an integer"),
    ("POST", "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -1}}, 400,
     "max_new_tokens must be >= 0"),
    ("POST", "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 10**9}}, 400,
     "exceed the context length 512"),
    ("POST", "/generate", {"input_ids": [7] * 600}, 400, "context length"),
    ("POST", "/generate", {"input_ids": [10**9]}, 400, "input_ids` must be integers in [0, 49152)"),
    ("POST", "/generate", {"input_ids": []}, 400, "prompt is empty"),
    ("POST", "/generate", {"text": "hi", "sampling_params": {"temperature": "hot"}}, 400,
     "temperature must be a finite number"),
    ("POST", "/generate", {"text": "hi", "sampling_params": {"top_p": 0}}, 400, "top_p must be in (0, 1]"),
    ("POST", "/generate", {"text": "hi", "sampling_params": {"json_schema": "{no"}}, 400, "json_schema is not valid JSON"),
    ("POST", "/generate", {"text": "hi", "sampling_params": {"bogus": 1}}, 400, "unknown sampling_params field"),
    ("POST", "/generate", {**GEN, "image_data": "http://x/cat.png"}, 400, "`image_data` is not supported"),
    ("POST", "/generate", {**GEN, "return_logprob": "yes"}, 400, "`return_logprob` must be a boolean"),
    ("POST", "/generate", {**GEN, "return_logprob": True, "logprob_start_len": 50}, 400, "logprob_start_len"),
    ("POST", "/generate", {**GEN, "top_logprobs_num": 99}, 400, "top_logprobs_num must be in [0, 20]"),
    ("POST", "/generate", {"text": ["a", "b"], "sampling_params": [{}]}, 400, "1 entries for 2 prompts"),
    ("POST", "/generate", {**GEN, "session_params": {"id": "nope"}}, 400, "no open session 'nope'"),
    ("POST", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {**CHAT, "messages": "hello"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {**CHAT, "messages": [{"content": "no role"}]}, 400, "role"),
    ("POST", "/v1/chat/completions", {**CHAT, "model": "gpt-9"}, 404, "the model `gpt-9` does not exist"),
    ("POST", "/v1/chat/completions", {"messages": CHAT["messages"]}, 400, "`model` is required"),
    ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": -5}, 400, "max_tokens must be >= 0"),
    ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 10**6}, 400, "exceed the context length"),
    ("POST", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "`temperature` must be a number"),
    ("POST", "/v1/chat/completions", {**CHAT, "frobnicate": True}, 400, "unknown field(s) ['frobnicate']"),
    ("POST", "/v1/chat/completions", {**CHAT, "n": 0}, 400, "n must be between 1 and"),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "`stream` must be a boolean"),
    ("POST", "/v1/chat/completions", {**CHAT, "top_logprobs": 3}, 400, "`top_logprobs` needs `logprobs: true`"),
    ("POST", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "`tools` is not supported"),
    ("POST", "/v1/chat/completions", {**CHAT, "stream_options": {"bogus": 1}}, 400, "in the stream_options"),
    ("POST", "/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("POST", "/v1/completions", {"model": "tiny"}, 400, "`prompt` is required"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": []}, 400, "`prompt` must be"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 50}, 400,
     "`logprobs` must be an integer between 0 and 20"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "`suffix` is not supported"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop must be a string"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "seed": -1}, 400, "seed must be >= 0"),
    ("GET", "/no_such_route", None, 404, "no route /no_such_route"),
    ("GET", "/generate", None, 405, "GET is not allowed on /generate"),
    ("POST", "/abort_request", {}, 400, "`rid` is required"),
    ("POST", "/close_session", {"session_id": "nope"}, 400, "no open session"),
    ("POST", "/open_session", {"capacity_of_str_len": "big"}, 400, "`capacity_of_str_len` must be an integer"),
    # found by tests/test_server_fuzz.py
    ("POST", "/v1/completions", {"model": "tiny", "prompt": [10**30], "echo": True}, 400,
     "`prompt` token ids must be integers in [0, 49152)"),  # was a 500: echo decoded them first
    ("POST", "/abort_request", {"rid": 7, "abort_all": True}, 400, "`rid` must be a string"),
    ("POST", "/generate", {"text": "hi", "sampling_params": {"temperature": 1e300}}, 400,
     "temperature must be at most 3.4e+38"),  # was inf in the float32 sampler
    ("POST", "/generate", {"text": "hi", "sampling_params": {"logit_bias": {"5": -1e39}}}, 400,
     "logit_bias must be biases at most"),
    ("POST", "/generate", {"text": "hi", "input_ids": [5]}, 400, "exactly one of `text` and `input_ids`"),
]


def send(http, method, path, body):
    if isinstance(body, dict):
        return http.request(method, path, json=body)
    return http.request(method, path, content=body, headers={"Content-Type": "application/json"})


def test_malformed_requests_get_clear_errors_then_a_good_one_works(http):
    assert len(CASES) >= 15
    failures = []
    for method, path, body, status, fragment in CASES:
        r = send(http, method, path, body)
        error = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or fragment not in error.get("message", "") or \
                set(error) != {"message", "type", "param", "code"}:
            failures.append(f"{method} {path} {body!r:.60}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    good = http.post("/generate", json={"text": "still serving", "sampling_params": {"max_new_tokens": 3}})
    assert good.status_code == 200, good.text
    assert good.json()["meta_info"]["completion_tokens"] == 3
    chat = http.post("/v1/chat/completions", json=CHAT)
    assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"] == "length"
    assert_idle_accounting(http)


def test_api_key_guards_every_route_but_health(server, http):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for method, path in [("POST", "/generate"), ("GET", "/get_server_info"), ("GET", "/v1/models"),
                             ("GET", "/metrics"), ("POST", "/flush_cache"), ("GET", "/health_generate")]:
            r = anonymous.request(method, path)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"], path
        r = anonymous.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert client.chat.completions.create(**CHAT).usage.completion_tokens == 2


class _Killed(BaseException):
    """Escapes every guard of the scheduler loop, as a real fatal error would."""


def test_dead_engine_answers_503(tmp_path_factory, monkeypatch):
    with running_server(tmp_path_factory) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        engine = server.app.state.server.engine
        assert http.get("/health").json()["status"] == "ok"

        def killed():
            raise _Killed("injected by the test")

        monkeypatch.setattr(engine.scheduler, "_iterate", killed)
        first = http.post("/generate", json=GEN)  # wakes the loop, which dies: this one ends aborted (or 503)
        assert first.status_code == 503 or first.json()["meta_info"]["finish_reason"]["type"] == "abort"
        for _ in range(100):
            if not engine.healthy:
                break
            time.sleep(0.05)
        assert not engine.healthy

        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert "scheduler died" in health.json()["reason"] and "_Killed" in health.json()["reason"]
        for path, body in [("/generate", GEN), ("/generate", {**GEN, "stream": True}),
                           ("/v1/chat/completions", CHAT), ("/v1/chat/completions", {**CHAT, "stream": True})]:
            r = http.post(path, json=body)
            assert r.status_code == 503, (path, r.text)
            assert "scheduler died" in r.json()["error"]["message"] and "restart" in r.json()["error"]["message"]
        r = http.get("/health_generate")
        assert r.status_code == 503 and "scheduler died" in r.json()["error"]["message"]
        assert http.get("/get_server_info").status_code == 503
        assert "jaxserve_requests_total" in http.get("/metrics").text  # still scraped without the engine
