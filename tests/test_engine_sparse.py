"""Quest sparse attention through the engine (tiny random Llama): a budget of the whole
context changes no greedy output; a tight one reads fewer KV tokens (reported per request
and, over HTTP, as a /metrics histogram), keeps page accounting exact under retraction,
compiles nothing after warm-up, and keeps every cached page's key bounds exact."""

import numpy as np
import pytest

from jaxserve.runner import compile_count
from tests.test_engine import GREEDY, assert_idle_accounting, make_engine

QUEST = dict(sparse_attention="quest", context_length=256)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng()
    shared = rng.integers(3, 49152, size=70).tolist()
    return ([shared + rng.integers(3, 49152, size=n).tolist() for n in (60, 3, 100)]
            + [rng.integers(3, 49152, size=n).tolist() for n in (150, 20, 9)])


@pytest.fixture(scope="module")
def dense(tiny_dir, prompts):
    e = make_engine(tiny_dir, context_length=256)
    try:
        return [r["output_ids"] for r in e.generate(input_ids=prompts, sampling_params=GREEDY)]
    finally:
        e.shutdown()


def test_budget_of_the_whole_context_is_dense(tiny_dir, prompts, dense):
    e = make_engine(tiny_dir, **QUEST, sparse_attention_token_budget=256, sparse_attention_min_context=0)
    try:
        results = e.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [r["output_ids"] for r in results] == dense
        assert all(r["meta_info"]["attention_sparsity_ratio"] == 0 for r in results)
    finally:
        e.shutdown()


def assert_tree_bounds_exact(engine) -> None:
    """Every page the device radix tree holds is full: its bounds are its keys' exact min / max."""
    pages, stack = [], [engine.scheduler.cache.root]
    while stack:
        node = stack.pop()
        if node.pages is not None:  # a host-only node (hierarchical cache) has no device pages
            pages.extend(int(p) for p in node.pages)
        stack.extend(node.children.values())
    assert pages
    runner = engine.scheduler.runner
    k = np.asarray(runner.k_cache)[:, pages]  # [L, n, page, H, D]
    lo, hi = (np.asarray(b)[:, pages] for b in runner.bounds)
    np.testing.assert_array_equal(lo, k.min(axis=2))
    np.testing.assert_array_equal(hi, k.max(axis=2))


def test_tight_budget_reads_less_and_keeps_state_exact(tiny_dir, prompts, dense):
    # 32 KV tokens per decode step for sequences of 64 tokens or more; a pool of 320 tokens
    # for ~600 tokens of work, so decode retracts; the radix cache reuses the shared prefix.
    e = make_engine(tiny_dir, **QUEST, sparse_attention_token_budget=32, sparse_attention_min_context=64,
                    max_total_tokens=320)
    try:
        compiles = compile_count()
        results = e.generate(input_ids=prompts, sampling_params=GREEDY)
        again = e.generate(input_ids=prompts[:3], sampling_params=GREEDY)  # the shared prefix from the cache
        assert compile_count() == compiles
        info = assert_idle_accounting(e)
        assert info["num_retractions"] > 0
        assert again[0]["meta_info"]["cached_tokens"] >= 64
        for prompt, r in zip(prompts + prompts[:3], results + again):
            ratio, n = r["meta_info"]["attention_sparsity_ratio"], len(prompt)
            assert len(r["output_ids"]) == GREEDY["max_new_tokens"]
            if n >= 64:  # decode read the sink page, the best others and the last: 32 tokens or fewer
                dense_read = sum(range(n + 1, n + GREEDY["max_new_tokens"]))
                assert ratio >= 1 - 32 * (GREEDY["max_new_tokens"] - 1) / dense_read - 1e-9
            else:
                assert ratio == 0
        for r, d, n in zip(results, dense, map(len, prompts)):
            if n < 64 - GREEDY["max_new_tokens"]:
                assert r["output_ids"] == d  # never sparse: the same tokens as the dense engine
        assert_tree_bounds_exact(e)
        assert_server_reports_the_ratio(e)
    finally:
        e.shutdown()


def assert_server_reports_the_ratio(engine) -> None:
    """Over HTTP: the ratio in `meta_info`, and its histogram in /metrics."""
    import httpx

    from jaxserve.server import ServerThread

    server = ServerThread(engine)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            ids = np.random.default_rng().integers(3, 49152, size=150).tolist()
            r = http.post("/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 8,
                                                                                    "temperature": 0}})
            assert r.status_code == 200
            ratio = r.json()["meta_info"]["attention_sparsity_ratio"]
            assert 0.5 < ratio < 1
            metrics = http.get("/metrics").text
            assert "jaxserve_attention_sparsity_ratio_count 1.0" in metrics
            assert f"jaxserve_attention_sparsity_ratio_sum {ratio}" in metrics
    finally:
        server.stop()


def test_flags_are_checked(tiny_dir):
    from jaxserve.config import ServerArgs, ServerArgsError

    with pytest.raises(ServerArgsError, match="at least 2 pages"):
        ServerArgs(sparse_attention="quest", sparse_attention_token_budget=16).validate()
    with pytest.raises(ServerArgsError, match="none or quest"):
        ServerArgs(sparse_attention="dense").validate()
    with pytest.raises(ServerArgsError, match=r"\(0, 1\)"):
        ServerArgs(attention_sparsity_threshold=1.5).validate()
