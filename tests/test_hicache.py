"""The hierarchical KV cache end to end (engine, tiny random Llama): a device pool so small
that a multi-turn workload evicts, with the host tier (L2) and the storage tier (L3)
serving the evicted prefixes back; greedy output must equal a run whose pool never
evicts. Also a warm restart from storage, a corrupt page file, storage faults, exact
accounting on both tiers, and what `/generate`, `/metrics` and `/get_token_usage` report."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import numpy as np
import pytest

import jaxserve
from jaxserve.config import ServerArgs, ServerArgsError
from jaxserve.memory import FileStorage, page_keys
from jaxserve.server import ServerThread
from tests.server_harness import compilation_cache_dir, tiny_model_dir

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
PAGE = 16
SMALL_POOL = 256  # tokens: 16 pages, less than the conversations hold
TURNS, CONVERSATIONS = 3, 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tiny_model_dir(tmp_path_factory)
    args = dict(max_running_requests=8, max_prefill_tokens=64, chunked_prefill_size=64, context_length=256,
                dtype="float32", compilation_cache_dir=compilation_cache_dir(tmp_path_factory))
    return str(path), args


def make(model, **kw):
    path, args = model
    return jaxserve.Engine(path, **{**args, **kw})


@pytest.fixture(scope="module")
def long_prompt():
    return np.random.default_rng(7).integers(3, 49152, size=150).tolist()


def run_workload(engine):
    """Round-robin multi-turn chats: each turn appends the reply and new user tokens, so a
    conversation comes back after the others have pushed it out of a small pool. Returns
    each reply as (token, logprob to 4 decimals) pairs and the tier details."""
    rng = np.random.default_rng(3)
    history = [rng.integers(3, 49152, size=60).tolist() for _ in range(CONVERSATIONS)]
    outputs, details = [], []
    for _ in range(TURNS):
        for i, prompt in enumerate(history):
            r = engine.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True)
            meta = r["meta_info"]
            outputs.append(pairs(r))
            if "cached_tokens_details" in meta:
                d = meta["cached_tokens_details"]
                assert sum(d.values()) == meta["cached_tokens"], d
                details.append(d)
            history[i] = prompt + r["output_ids"] + rng.integers(3, 49152, size=5).tolist()
    return outputs, details


def pairs(response) -> list[tuple[int, float]]:
    """The reply as (token, logprob) pairs."""
    return [(t, lp) for lp, t, _ in response["meta_info"]["output_token_logprobs"]]


def assert_same(replies, expected) -> None:
    """The same tokens, and logprobs equal up to the float noise of other prefill chunk
    boundaries. (Which page holds which KV is checked exactly in test_hicache_tree.py:
    the tiny random model attends almost uniformly, so even pages out of order would
    keep its greedy choice.)"""
    assert [[t for t, _ in r] for r in replies] == [[t for t, _ in r] for r in expected]
    got, want = ([lp for r in x for _, lp in r] for x in (replies, expected))
    np.testing.assert_allclose(got, want, atol=1e-4)


def reply(engine, prompt):
    return pairs(engine.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True))


@pytest.fixture(scope="module")
def reference(model, long_prompt):
    """A pool that never evicts, no hierarchical cache."""
    engine = make(model, max_total_tokens=8192)
    try:
        outputs, _ = run_workload(engine)
        long = reply(engine, long_prompt)
        assert engine.get_server_info()["num_retractions"] == 0
        return outputs, long
    finally:
        engine.shutdown()


def tier_totals(details):
    return {tier: sum(d[tier] for d in details) for tier in ("device", "host", "storage")}


def assert_idle_tiers(engine):
    info = engine.get_server_info()
    assert info["num_running_reqs"] == info["num_waiting_reqs"] == 0
    assert info["free_pages"] + info["evictable_pages"] + info["locked_pages"] == info["total_pages"]
    assert info["locked_pages"] == 0
    assert info["host_free_pages"] + info["host_evictable_pages"] + info["host_locked_pages"] == info["host_total_pages"]
    assert info["host_locked_pages"] == 0
    return info


@pytest.fixture(scope="module")
def l2_engine(model):
    engine = make(model, max_total_tokens=SMALL_POOL, enable_hierarchical_cache=True, hicache_ratio=4)
    yield engine
    engine.shutdown()


def test_host_tier_serves_evicted_prefixes_with_identical_output(reference, l2_engine):
    outputs, details = run_workload(l2_engine)
    assert_same(outputs, reference[0])
    totals = tier_totals(details)
    assert totals["host"] > 0 and totals["storage"] == 0, totals
    info = assert_idle_tiers(l2_engine)
    assert info["h2d_pages"] > 0 and info["d2h_pages"] > 0 and info["compilations_after_warmup"] == 0


SMALL_POOL_VARIANTS = {
    "write_back": dict(hicache_write_policy="write_back"),
    # the budget covers the context, so the replies are the dense reference's
    "sparse_attention": dict(sparse_attention="quest", sparse_attention_token_budget=256,
                             sparse_attention_min_context=0),
}


@pytest.mark.parametrize("variant", sorted(SMALL_POOL_VARIANTS))
def test_small_pool_variant_gives_identical_output(model, reference, variant):
    """write_back: pages reach the host only when evicted. sparse_attention: pages loaded
    back from the host get their key bounds from the loaded keys, so every page the device
    tree holds afterwards has exact bounds."""
    engine = make(model, max_total_tokens=SMALL_POOL, enable_hierarchical_cache=True, hicache_ratio=4,
                  **SMALL_POOL_VARIANTS[variant])
    try:
        outputs, details = run_workload(engine)
        assert_same(outputs, reference[0])
        assert tier_totals(details)["host"] > 0
        if variant == "write_back":
            assert_idle_tiers(engine)
        else:
            from tests.test_engine_sparse import assert_tree_bounds_exact

            assert_tree_bounds_exact(engine)
    finally:
        engine.shutdown()


def test_aborts_leave_both_tiers_exact_and_http_reports_tiers(l2_engine, long_prompt, reference):
    stream = l2_engine.generate(input_ids=long_prompt, sampling_params={**GREEDY, "max_new_tokens": 60}, stream=True,
                                rid="hicache-abort")
    for n, _ in enumerate(stream):
        if n == 2:
            threading.Thread(target=l2_engine.abort, args=("hicache-abort",)).start()
    l2_engine.generate(input_ids=[long_prompt[:40], long_prompt[:90]], sampling_params=GREEDY)
    assert_idle_tiers(l2_engine)
    server = ServerThread(l2_engine)
    try:
        for filler in range(3):  # push the long prompt's pages out of the device pool
            l2_engine.generate(input_ids=np.random.default_rng(filler).integers(3, 49152, 200).tolist(),
                               sampling_params=GREEDY)
        r = httpx.post(server.url + "/generate", json={"input_ids": long_prompt, "sampling_params": GREEDY,
                                                       "return_logprob": True}, timeout=60).json()
        assert_same([pairs(r)], [reference[1]])
        assert r["meta_info"]["cached_tokens_details"]["host"] > 0, r["meta_info"]
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        assert 'jaxserve_cached_tokens_by_tier_total{tier="host"}' in metrics
        h2d = [line for line in metrics.splitlines()
               if line.startswith('jaxserve_hicache_transfer_bytes_total{direction="h2d"}')]
        assert h2d and float(h2d[0].split()[-1]) > 0
        assert 'jaxserve_hicache_bandwidth_bytes_per_second{direction="d2h"}' in metrics
        stack, nodes = [httpx.get(server.url + "/radix_tree", timeout=30).json()["root"]], []
        while stack:
            nodes.append(stack.pop())
            stack.extend(nodes[-1]["children"])
        assert any(n["num_pages"] == 0 and n["host_pages"] > 0 for n in nodes)  # only on the host
        usage = httpx.get(server.url + "/get_token_usage", timeout=30).json()
        assert usage["host_total_tokens"] == usage["host_free_tokens"] + usage["host_evictable_tokens"]
    finally:
        server.stop()
    assert_idle_tiers(l2_engine)


def tiny_host_gb(model, pages: int) -> float:
    config = json.loads(open(f"{model[0]}/config.json").read())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    page_bytes = 2 * config["num_hidden_layers"] * PAGE * config["num_key_value_heads"] * head_dim * 4
    return (pages + 0.5) * page_bytes / (1 << 30)


def test_storage_tier_with_tiny_host_and_warm_restart(model, reference, long_prompt, tmp_path):
    store = tmp_path / "not-yet" / "kv"  # missing at start-up: created
    kw = dict(max_total_tokens=SMALL_POOL, enable_hierarchical_cache=True, hicache_size=tiny_host_gb(model, 11),
              hicache_storage_backend="file", hicache_storage_dir=str(store),
              hicache_storage_prefetch_policy="wait_complete")
    engine = make(model, **kw)
    try:
        outputs, details = run_workload(engine)
        assert_same(outputs, reference[0])
        assert tier_totals(details)["storage"] > 0, tier_totals(details)
        assert_same([reply(engine, long_prompt)], [reference[1]])
        namespace = engine.scheduler.hicache.namespace
        assert_idle_tiers(engine)
    finally:
        engine.shutdown()  # waits for the copies in flight: storage has every page
    # corrupt the long prompt's fourth page on disk: the restart reads three, computes the rest
    keys = page_keys(long_prompt[:149], PAGE, namespace)
    files = FileStorage(store, (1,), np.float32)
    path = files.path(keys[3])
    blob = bytearray(open(path, "rb").read())
    blob[-3] ^= 0xFF
    open(path, "wb").write(bytes(blob))
    engine = make(model, **kw)
    try:
        r = engine.generate(input_ids=long_prompt, sampling_params=GREEDY, return_logprob=True)
        assert_same([pairs(r)], [reference[1]])
        assert r["meta_info"]["cached_tokens_details"] == {"device": 0, "host": 0, "storage": 3 * PAGE}
        info = assert_idle_tiers(engine)
        assert info["storage_corrupt_pages"] == 1 and info["storage_read_pages"] == 3
    finally:
        engine.shutdown()


def test_storage_faults_cost_only_the_storage_tier(model, reference, long_prompt, tmp_path, caplog):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for i in range(256):  # every page file's subdirectory is taken by a file: no write can succeed
        (blocked / f"{i:02x}").write_text("")
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    caplog.set_level(logging.WARNING)
    for store in (blocked, not_a_dir):
        engine = make(model, max_total_tokens=SMALL_POOL, enable_hierarchical_cache=True,
                      hicache_storage_backend="file", hicache_storage_dir=str(store))
        try:
            for _ in range(2):
                assert_same([reply(engine, long_prompt)], [reference[1]])
            info = assert_idle_tiers(engine)
        finally:
            engine.shutdown()
        if store is blocked:
            assert info["storage_write_failures"] > 0 and info["storage_written_pages"] == 0
            assert any("cannot write" in r.getMessage() for r in caplog.records)
        else:
            assert "storage_write_failures" not in info
            assert any("storage tier is off" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kw, match", [
    (dict(hicache_ratio=0.5), "--hicache-ratio must be >= 1"),
    (dict(hicache_size=1e7), "more than this machine"),
    (dict(hicache_storage_backend="file", hicache_storage_dir="/tmp/x"), "needs --enable-hierarchical-cache"),
    (dict(enable_hierarchical_cache=True, hicache_storage_backend="file"), "needs --hicache-storage-dir"),
    (dict(enable_hierarchical_cache=True, hicache_write_policy="sometimes"), "--hicache-write-policy"),
    (dict(enable_hierarchical_cache=True, disable_radix_cache=True), "needs the radix cache"),
])
def test_flags_that_make_no_sense_are_clear_errors(kw, match):
    with pytest.raises(ServerArgsError, match=match):
        ServerArgs(**kw)
