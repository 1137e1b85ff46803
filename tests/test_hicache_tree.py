"""The hierarchical cache's tree and transfers (memory/hiradix_cache.py, memory/hicache.py)
against a brute-force model of what the KV should be.

A random multi-turn workload runs through the tree as the scheduler drives it: match over
both tiers, load the host part back through the real page transfers (`PageIO` over a real
JAX pool, no model), "compute" the rest by writing each page's reference KV (a value
derived from the whole prefix the page ends), insert, unlock. Every page a match hands out
must hold its prefix's reference value, whatever was evicted, backed up and loaded in
between; both tiers' accounting must be exact after each request.
"""

from __future__ import annotations

import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.memory import HiCache, HiRadixCache, HostKVPool, PageAllocator, host_pool_pages
from jaxserve.memory.host_pool import HostPoolSizeError
from jaxserve.runner import PageIO
from jaxserve.scheduler.pages import PageBook, pages_for

PS, LAYERS, HEADS, DIM = 2, 2, 1, 4
DEVICE_PAGES, HOST_PAGES = 11, 17  # including page 0


def reference_page(tokens: np.ndarray, i: int) -> float:
    """The KV value of page `i` of `tokens`: a function of the whole prefix it ends."""
    return float(zlib.crc32(np.asarray(tokens[: (i + 1) * PS], np.int32).tobytes()) % 100003)


def page_values(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    k = np.broadcast_to(np.asarray(values, np.float32)[None, :, None, None, None],
                        (LAYERS, len(values), PS, HEADS, DIM)).copy()
    return k, -k


def make_tiers(policy: str):
    zeros = jnp.zeros((LAYERS, DEVICE_PAGES, PS, HEADS, DIM), jnp.float32)
    pool = types.SimpleNamespace(k_cache=zeros, v_cache=zeros + 0, bounds=None,
                                 kv_sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    io = PageIO(pool, max_pages=4)
    allocator = PageAllocator(DEVICE_PAGES)
    host = HostKVPool(HOST_PAGES, (PS, HEADS, DIM), np.float32, LAYERS)
    cache = HiRadixCache(allocator, PS, host.allocator, policy)
    hicache = HiCache(cache, host, io, load_quota_pages=64)
    book = PageBook(cache, allocator, runner=None, max_session_pages=0, hicache=hicache)
    return io, cache, hicache, book


def serve(tokens: np.ndarray, io, cache: HiRadixCache, hicache: HiCache, book: PageBook,
          load: bool) -> tuple[int, int]:
    """One request as the scheduler serves it (without `load`, as when the load is
    refused: it computes its host part); returns (device hit, loaded) tokens after
    checking every cached page it was handed."""
    limit = len(tokens) - 1
    hicache.begin_pass()
    match = cache.match_tiers(tokens[:limit])
    node, pages = match.node, match.pages
    cache.lock(node)
    loaded = hicache.load(book, match.host_nodes) if match.host_nodes and load else 0
    if loaded:
        cache.lock(match.host_nodes[-1])
        cache.unlock(node)
        node, pages = match.host_nodes[-1], cache.path_pages(match.host_nodes[-1])
    assert len(pages) * PS == len(match.pages) * PS + loaded
    if len(pages):
        got = np.concatenate([np.asarray(k)[0, :n, 0, 0, 0] for n, k, _ in io.gather(pages)])
        np.testing.assert_array_equal(got, [reference_page(tokens, i) for i in range(len(pages))])
    # compute the rest: private pages get the reference KV of their prefixes
    full = len(tokens) // PS
    need = pages_for(len(tokens), PS) - len(pages)
    assert book.reserve(need)
    own = book.allocator.alloc(need)
    all_pages = np.concatenate([pages, own]).astype(np.int32)
    k, v = page_values([reference_page(tokens, i) for i in range(len(pages), len(all_pages))])
    for at, n in io.pieces(len(own)):
        io.scatter(own[at : at + n], k[:, at : at + n], v[:, at : at + n])
    present, _ = cache.insert_with_node(tokens[: full * PS], all_pages[:full])
    first = len(pages)
    book.allocator.free(all_pages[first : max(present // PS, first)])
    book.allocator.free(all_pages[full:])
    cache.unlock(node)
    return len(match.pages) * PS, loaded


def check_accounting(cache: HiRadixCache, hicache: HiCache) -> None:
    nodes = list(cache._nodes.values())
    assert cache.free_pages + cache.evictable_pages + cache.locked_pages == cache.total_pages
    assert cache.locked_pages == 0
    assert cache.evictable_pages == sum(len(n.pages) for n in nodes if n.pages is not None)
    host_settled = sum(len(n.host) for n in nodes if n.host is not None and n.writing is None)
    assert cache.host_evictable_pages == host_settled
    host = cache.host_allocator
    assert host.num_free + cache.host_evictable_pages + hicache.locked_pages == host.num_pages - 1
    for n in nodes:
        assert n.pages is not None or n.host is not None, "a node with its KV nowhere"
        if n.pages is not None and n.parent is not cache.root:
            assert n.parent.pages is not None, "a device node under a host-only one"
    # the incremental shared-prefix counters against a walk of the tree
    branches = [cache.depth(n) for n in nodes if len(n.children) >= 2]
    assert cache.shared_nodes == len(branches)
    assert cache.mean_shared_depth == (sum(branches) / len(branches) if branches else 0.0)


@pytest.mark.parametrize("policy", ["write_through", "write_through_selective", "write_back"])
def test_random_multi_turn_workload_keeps_kv_and_accounting(policy):
    rng = np.random.default_rng(zlib.crc32(policy.encode()))
    io, cache, hicache, book = make_tiers(policy)
    convs = [rng.integers(1, 6, size=rng.integers(3, 8)) for _ in range(5)]
    device_hits = loads = 0
    for step in range(120):
        i = int(rng.integers(len(convs)))
        if len(convs[i]) > 14:
            convs[i] = convs[i][: rng.integers(3, 8)]  # a new conversation on an old prefix
        tokens = np.concatenate([convs[i], rng.integers(1, 6, size=rng.integers(1, 4))]).astype(np.int32)
        convs[i] = tokens
        hit, loaded = serve(tokens, io, cache, hicache, book, load=rng.random() < 0.8)
        device_hits += hit
        loads += loaded
        if rng.random() < 0.5:
            hicache.poll()  # else copies stay in flight into the next request
        if rng.random() < 0.1:
            cache.evict_host(int(rng.integers(1, 4)))
        check_accounting(cache, hicache)
    hicache.poll(wait=True)
    check_accounting(cache, hicache)
    assert hicache.locked_pages == 0
    assert device_hits > 0 and loads > 0, (device_hits, loads)
    hicache.flush()
    assert cache.evictable_pages == 0 and cache.host_evictable_pages == 0 and cache.num_nodes == 0
    hicache.close()


def test_host_pool_size_is_checked():
    assert host_pool_pages(100, 1000, 2.0, None) == 201
    assert host_pool_pages(100, 1000, 1.0, 1e-6) == 1073 // 1000 + 1
    with pytest.raises(HostPoolSizeError, match="--hicache-ratio must be >= 1"):
        host_pool_pages(100, 1000, 0.5, None)
    with pytest.raises(HostPoolSizeError, match="this machine has"):
        host_pool_pages(10**9, 10**9, 2.0, None)
