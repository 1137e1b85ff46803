"""KV pool sizing: every path with fake device stats, and the errors' advice."""

import dataclasses

import pytest

from jaxserve.memory import KVPoolSizeError, kv_bytes_per_token, size_kv_pool
from jaxserve.memory.sizing import CPU_KV_BUDGET_BYTES, CPU_MAX_TOTAL_TOKENS

GiB = 1 << 30
MiB = 1 << 20


def test_kv_bytes_per_token_counts_k_and_v_over_layers():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, bf16.
    assert kv_bytes_per_token(30, 3, 64, "bfloat16") == 2 * 30 * 3 * 64 * 2
    assert kv_bytes_per_token(2, 1, 8, "float32") == 2 * 2 * 1 * 8 * 4


def test_max_total_tokens_rounds_down_to_whole_pages_plus_dummy():
    size = size_kv_pool(weights_bytes=100, kv_bytes_per_token=10, page_size=16,
                        max_total_tokens=1000, memory_stats=None)
    assert (size.num_pages, size.max_total_tokens, size.source) == (63, 992, "max_total_tokens")
    assert size.kv_bytes == 63 * 16 * 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        size.num_pages = 1  # type: ignore[misc]


def test_max_total_tokens_must_fit_on_the_device():
    stats = {"bytes_limit": 10 * GiB, "bytes_in_use": 2 * GiB}
    ok = size_kv_pool(weights_bytes=2 * GiB, kv_bytes_per_token=MiB, page_size=1,
                      max_total_tokens=7000, workspace_bytes=0, memory_stats=stats)
    assert ok.max_total_tokens == 7000
    with pytest.raises(KVPoolSizeError, match="lower --max-total-tokens"):
        size_kv_pool(weights_bytes=2 * GiB, kv_bytes_per_token=MiB, page_size=1,
                     max_total_tokens=9000, workspace_bytes=0, memory_stats=stats)


def test_mem_fraction_budget_is_fraction_of_limit_minus_weights_and_workspace():
    stats = {"bytes_limit": 80 * GiB, "bytes_in_use": 1 * MiB}  # weights not loaded yet
    size = size_kv_pool(weights_bytes=16 * GiB, kv_bytes_per_token=128 * 1024, page_size=16,
                        mem_fraction_static=0.5, workspace_bytes=2 * GiB, memory_stats=stats)
    budget = 40 * GiB - 16 * GiB - 2 * GiB
    page_bytes = 16 * 128 * 1024
    assert size.source == "mem_fraction_static"
    assert size.num_pages == budget // page_bytes  # the dummy page comes out of the budget
    assert size.kv_bytes <= budget < size.kv_bytes + page_bytes
    # Weights already on the device are not counted twice; other usage is counted.
    loaded = size_kv_pool(weights_bytes=16 * GiB, kv_bytes_per_token=128 * 1024, page_size=16,
                          mem_fraction_static=0.5, workspace_bytes=2 * GiB,
                          memory_stats={"bytes_limit": 80 * GiB, "bytes_in_use": 16 * GiB})
    assert loaded == size
    busier = size_kv_pool(weights_bytes=16 * GiB, kv_bytes_per_token=128 * 1024, page_size=16,
                          mem_fraction_static=0.5, workspace_bytes=2 * GiB,
                          memory_stats={"bytes_limit": 80 * GiB, "bytes_in_use": 20 * GiB})
    assert busier.num_pages == size.num_pages - 4 * GiB // page_bytes


def test_default_fraction_is_085():
    stats = {"bytes_limit": 100 * MiB, "bytes_in_use": 0}
    size = size_kv_pool(weights_bytes=0, kv_bytes_per_token=1024, page_size=1,
                        workspace_bytes=0, memory_stats=stats)
    assert size.num_pages == int(0.85 * 100 * MiB) // 1024


def test_cpu_default_budget_capped_and_grown_for_context_length():
    small = size_kv_pool(weights_bytes=0, kv_bytes_per_token=1024, page_size=16, memory_stats=None)
    assert small.max_total_tokens == CPU_MAX_TOTAL_TOKENS and small.source == "cpu_default"
    big = size_kv_pool(weights_bytes=0, kv_bytes_per_token=1 << 20, page_size=16, memory_stats=None)
    assert big.max_total_tokens == CPU_KV_BUDGET_BYTES // (1 << 20)
    long_ctx = size_kv_pool(weights_bytes=0, kv_bytes_per_token=1 << 20, page_size=16,
                            context_length=5000, memory_stats=None)
    assert long_ctx.num_pages - 1 == -(-5000 // 16)


def test_errors_name_the_flag_and_direction():
    stats = {"bytes_limit": 10 * GiB, "bytes_in_use": 0}
    with pytest.raises(KVPoolSizeError, match="raise --mem-fraction-static"):
        size_kv_pool(weights_bytes=9 * GiB, kv_bytes_per_token=MiB, page_size=16,
                     memory_stats=stats)
    with pytest.raises(KVPoolSizeError, match="lower --context-length or raise --mem-fraction-static"):
        size_kv_pool(weights_bytes=7 * GiB, kv_bytes_per_token=MiB, page_size=16,
                     context_length=32768, workspace_bytes=0, memory_stats=stats)
    with pytest.raises(KVPoolSizeError, match="raise --max-total-tokens or lower --context-length"):
        size_kv_pool(weights_bytes=0, kv_bytes_per_token=1, page_size=16,
                     max_total_tokens=4000, context_length=4096, memory_stats=None)
    with pytest.raises(KVPoolSizeError, match=r"--mem-fraction-static must be in \(0, 1\]"):
        size_kv_pool(weights_bytes=0, kv_bytes_per_token=1, page_size=1,
                     mem_fraction_static=1.5, memory_stats=stats)
    assert issubclass(KVPoolSizeError, ValueError)


def test_log_line_has_the_numbers():
    size = size_kv_pool(weights_bytes=3 * GiB, kv_bytes_per_token=46080, page_size=16,
                        max_total_tokens=4096, memory_stats=None)
    line = size.log_line()
    assert "\n" not in line
    for part in ("weights 3.00 GiB", "46080 B/token", "257 pages", "page_size 16", "max 4096 tokens"):
        assert part in line


def test_reads_device_stats_by_default():
    # The CPU backend has no memory stats, so the default path is the CPU budget.
    size = size_kv_pool(weights_bytes=0, kv_bytes_per_token=1024, page_size=16)
    assert size.source == "cpu_default"
