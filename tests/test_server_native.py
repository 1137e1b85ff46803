"""SGLang-native routes against a real server: /generate fields, cumulative streaming, batches,
prefill-only caching, logprobs, abort, sessions, info routes and /metrics."""

import json
import threading

from prometheus_client.parser import text_string_to_metric_families

from tests.server_harness import assert_idle_accounting, http, server  # noqa: F401 (fixtures)

GREEDY = {"max_new_tokens": 8, "temperature": 0}


def sse_events(http, body) -> list:
    """Every `data:` payload of a streamed /generate; asserts nothing else is on the stream."""
    events = []
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    for block in blocks[:-2]:
        assert block.startswith("data: ") and "\n" not in block, block
        events.append(json.loads(block[len("data: "):]))
    return events


def metric_samples(http) -> dict:
    text = http.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_info_routes(http, server):
    info = http.get("/get_model_info").json()
    assert info["is_generation"] is True and isinstance(info["model_path"], str)
    server_info = http.get("/get_server_info").json()
    for key in ("context_length", "max_total_num_tokens", "free_pages", "evictable_pages", "locked_pages",
                "total_pages", "num_running_reqs", "num_waiting_reqs", "cache_hit_rate",
                "compilations_after_warmup", "max_running_requests", "page_size"):
        assert key in server_info, key
    assert server_info["context_length"] == 512
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    summary = health.json()["radix_cache"]  # counters read without the scheduler thread
    assert summary["nodes"] >= 0 and 0 <= summary["hit_rate"] <= 1
    assert http.get("/model_info").json() == info  # newer SGLang clients' names for the same routes
    assert http.get("/server_info").json()["context_length"] == 512
    assert http.get("/health_generate").status_code == 200
    usage = http.get("/get_token_usage").json()
    assert usage["total_tokens"] == server_info["total_pages"] * server_info["page_size"]
    assert {"used_tokens", "num_running_reqs", "cache_hit_rate", "num_requests"} <= set(usage)


def test_health_radix_stats_match_the_tree(http):
    shared = list(range(300, 340))  # 40 tokens: two whole pages of 16 at least
    for tail in ([1, 2, 3] * 6, [4, 5, 6] * 6, [7, 8] * 9):
        http.post("/generate", json={"input_ids": shared + tail, "sampling_params": {"max_new_tokens": 1}})
    summary = http.get("/health").json()["radix_cache"]
    tree = http.get("/radix_tree").json()

    def branches(node, depth):  # (depth in tokens) of every non-root node with two or more children
        depth += node["num_tokens"]
        own = [depth] if len(node["children"]) >= 2 and node is not tree["root"] else []
        return own + [d for child in node["children"] for d in branches(child, depth)]

    found = branches(tree["root"], 0)
    assert summary["shared_prefix_nodes"] == len(found) >= 1
    assert summary["mean_shared_prefix_tokens"] == round(sum(found) / len(found), 2)
    count = lambda node: len(node["children"]) + sum(count(c) for c in node["children"])  # noqa: E731
    assert summary["nodes"] == count(tree["root"])
    tiers = summary["hit_rate_by_tier"]
    assert set(tiers) == {"device"} and tiers["device"] == summary["hit_rate"] > 0


def test_generate_fields(http):
    out = http.post("/generate", json={"text": "The sky is", "sampling_params": GREEDY, "rid": "fields-1"}).json()
    meta = out["meta_info"]
    assert isinstance(out["text"], str) and len(out["output_ids"]) == 8
    assert meta["id"] == "fields-1" and meta["completion_tokens"] == 8 and meta["prompt_tokens"] > 0
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["cached_tokens"] >= 0 and meta["e2e_latency"] > 0
    assert "The sky is" not in out["text"]  # completion only

    by_ids = http.post("/generate", json={"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": GREEDY}).json()
    by_text = http.post("/generate", json={"text": ["The sky is", "Hello"], "sampling_params": GREEDY}).json()
    assert isinstance(by_ids, list) and len(by_ids) == 2
    assert by_text[0]["output_ids"] == out["output_ids"]  # batching changes nothing (greedy)
    per_prompt = http.post("/generate", json={"text": ["a", "b"], "sampling_params": [
        {"max_new_tokens": 1}, {"max_new_tokens": 3}]}).json()
    assert [o["meta_info"]["completion_tokens"] for o in per_prompt] == [1, 3]
    two = http.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 2, "n": 2}}).json()
    assert isinstance(two, list) and len(two) == 2


def test_stream_is_cumulative(http):
    body = {"text": "Streaming works", "sampling_params": {**GREEDY, "max_new_tokens": 12}}
    events = sse_events(http, body)
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert events[-1]["meta_info"]["completion_tokens"] == 12
    assert texts[-1] == http.post("/generate", json=body).json()["text"]

    # Logprobs stream incrementally (newer SGLang clients): each chunk holds only its new entries.
    events = sse_events(http, {**body, "return_logprob": True, "top_logprobs_num": 2})
    assert sum(len(e["meta_info"]["output_token_logprobs"]) for e in events) == 12
    assert sum(len(e["meta_info"]["output_top_logprobs"]) for e in events) == 12
    assert all(e["meta_info"]["output_token_logprobs_length"] == e["meta_info"]["completion_tokens"] for e in events)

    batch = sse_events(http, {"text": ["a", "b"], "sampling_params": {"max_new_tokens": 3}})
    assert {e["index"] for e in batch} == {0, 1}
    assert sum(e["meta_info"]["finish_reason"] is not None for e in batch) == 2


def test_prefill_only_then_cached(http):
    prompt = "Shared prefix for the frontend's fork. " * 8
    first = http.post("/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 0}}).json()
    assert first["text"] == "" and first["meta_info"]["completion_tokens"] == 0
    assert first["meta_info"]["finish_reason"]["type"] == "length"
    n = first["meta_info"]["prompt_tokens"]
    second = http.post("/generate", json={"text": prompt + "Go on:", "sampling_params": GREEDY}).json()
    assert second["meta_info"]["cached_tokens"] == n // 16 * 16 > 0


def test_logprobs_and_select_style_scoring(http):
    out = http.post("/generate", json={"text": "one two three", "sampling_params": GREEDY, "return_logprob": True,
                                       "logprob_start_len": 0, "top_logprobs_num": 2,
                                       "return_text_in_logprobs": True}).json()
    meta = out["meta_info"]
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert meta["input_token_logprobs"][0][0] is None
    assert len(meta["output_token_logprobs"]) == 8
    logprob, token, text = meta["output_token_logprobs"][0]
    assert token == out["output_ids"][0] and isinstance(text, str) and logprob <= 0
    assert len(meta["output_top_logprobs"][0]) == 2
    # How the SGLang frontend's `select` scores choices: one batch, prefill only, input logprobs.
    choices = [" red", " green", " blue"]
    scored = http.post("/generate", json={"text": ["My favourite colour is" + c for c in choices],
                                          "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                                          "return_logprob": True, "return_text_in_logprobs": True,
                                          "logprob_start_len": 3}).json()
    assert len(scored) == 3
    assert all(len(s["meta_info"]["input_token_logprobs"]) == s["meta_info"]["prompt_tokens"] - 3 for s in scored)


def test_stops_and_unsupported_grammar(http):
    text = http.post("/generate", json={"text": "Count:", "sampling_params": {**GREEDY, "max_new_tokens": 16}}).json()
    full = text["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    out = http.post("/generate", json={"text": "Count:", "sampling_params": {
        **GREEDY, "max_new_tokens": 16, "stop": stop}}).json()
    assert out["text"] == full[: full.find(stop)] and out["meta_info"]["finish_reason"]["matched"] == stop
    stream = sse_events(http, {"text": "Count:", "sampling_params": {**GREEDY, "max_new_tokens": 16, "stop": [stop]}})
    assert all(full.startswith(e["text"]) for e in stream)  # never shows text it takes back
    ids = text["output_ids"]
    out = http.post("/generate", json={"text": "Count:", "sampling_params": {
        **GREEDY, "max_new_tokens": 16, "stop_token_ids": [ids[3]]}}).json()
    assert out["output_ids"] == ids[: ids.index(ids[3]) + 1]
    r = http.post("/generate", json={"text": "x", "sampling_params": {"regex": "[a-z"}})
    assert r.status_code == 400 and "sampling_params.regex" in r.json()["error"]["message"]


def test_abort_request_and_flush(http):
    events, started = [], threading.Event()

    def run():
        body = {"text": "abort me", "rid": "to-abort", "stream": True,
                "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
        with http.stream("POST", "/generate", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    started.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(30)
    # the running request's pages count as used: its tail is outside the tree, neither locked nor free
    usage = http.get("/get_token_usage").json()
    assert usage["used_tokens"] == usage["total_tokens"] - usage["free_tokens"] - usage["cached_tokens"] > 0
    pages = {labels[0][1]: v for (name, labels), v in metric_samples(http).items() if name == "jaxserve_kv_pages"}
    assert pages["free"] + pages["evictable"] + pages["locked"] + pages["private"] == pages["total"]
    assert pages["private"] > 0
    assert http.post("/abort_request", json={"rid": "to-abort"}).json()["aborted"] == 1
    thread.join(30)
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert events[-1]["meta_info"]["completion_tokens"] < 400
    assert_idle_accounting(http)
    assert http.post("/flush_cache").status_code == 200  # SGLang clients send no body ...
    assert http.post("/flush_cache", json={}).status_code == 200  # ... or {}
    assert http.post("/flush_cache", json={"empty_cache": True}).status_code == 200  # ... or this (newer)
    assert http.get("/get_server_info").json()["evictable_pages"] == 0


def test_sessions_keep_conversation_cached(http):
    sid = http.post("/open_session", json={"capacity_of_str_len": 1000}).json()
    assert isinstance(sid, str)
    first = http.post("/generate", json={"text": "Turn one of a long talk. " * 6, "session_params": {"id": sid},
                                         "sampling_params": GREEDY}).json()
    second = http.post("/generate", json={"text": " Turn two.", "session_params": {"id": sid},
                                          "sampling_params": GREEDY}).json()
    total = first["meta_info"]["prompt_tokens"] + 8
    assert second["meta_info"]["prompt_tokens"] > total  # the conversation so far + the new turn
    assert second["meta_info"]["cached_tokens"] >= total // 16 * 16 - 16
    assert http.get("/get_server_info").json()["locked_pages"] > 0  # held for the next turn
    assert http.post("/close_session", json={"session_id": sid}).status_code == 200
    r = http.post("/close_session", json={"session_id": sid})
    assert r.status_code == 400 and "no open session" in r.json()["error"]["message"]
    assert_idle_accounting(http)


def test_metrics_parse_and_move(http):
    before = metric_samples(http)
    http.post("/generate", json={"text": "count me", "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}})
    http.post("/generate", json={"text": "bad", "sampling_params": {"max_new_tokens": -1}})
    after = metric_samples(http)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("jaxserve_requests_total", outcome="length") == 1
    assert delta("jaxserve_requests_total", outcome="invalid") == 1
    assert delta("jaxserve_generation_tokens_total") == 5
    assert delta("jaxserve_prompt_tokens_total") > 0
    assert delta("jaxserve_time_to_first_token_seconds_count") == 1
    assert delta("jaxserve_inter_token_latency_seconds_count") >= 1
    assert after[("jaxserve_kv_pages", (("state", "total"),))] > 0
    assert after[("jaxserve_compilations_after_warmup_total", ())] == 0
    assert ("jaxserve_num_running_reqs", ()) in after
