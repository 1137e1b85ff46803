"""RadixCache against a brute-force model, plus hand-built LRU and interface checks.

The model is a dict from every cached page-aligned prefix (a tuple of tokens) to the page
holding its last page, its LRU time and its lock count. It knows nothing of edges,
splits or heaps; eviction is checked against what LRU over that dict allows.
"""

import collections
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxserve.memory import NoRadixCache, PageAllocator, RadixCache, export_tree, pretty_tree

# ---------------------------------------------------------------- stateful model test


@dataclass
class Entry:
    page: int
    time: int
    locks: int = 0


@dataclass
class Request:
    tokens: list[int]
    prefix: np.ndarray  # pages from match_prefix, owned by the cache
    own: np.ndarray  # pages the request allocated
    node: object
    matched: list[tuple[int, ...]]  # model prefixes the request locked


def sequences(page_size: int) -> st.SearchStrategy[list[int]]:
    """Token lists built from a few page patterns (so prefixes collide), an optional
    one-token mutation (so mismatches fall inside pages) and a partial tail page."""
    pattern = {0: [0], 1: [1], 2: [1, 2]}

    def page(pid: int) -> list[int]:
        return (pattern[pid] * page_size)[:page_size]

    @st.composite
    def build(draw):
        pids = draw(st.lists(st.integers(0, 2), max_size=6 if page_size > 1 else 10))
        tokens = [t for pid in pids for t in page(pid)]
        tokens += draw(st.lists(st.integers(0, 2), max_size=page_size - 1))
        if tokens and draw(st.booleans()):
            tokens[draw(st.integers(0, len(tokens) - 1))] = 7
        return tokens

    return build()


class RadixModelMachine(RuleBasedStateMachine):
    PAGE_SIZE = 1
    NUM_PAGES = 40

    def __init__(self) -> None:
        super().__init__()
        ps = self.PAGE_SIZE
        self.alloc = PageAllocator(self.NUM_PAGES)
        self.cache = RadixCache(self.alloc, ps)
        self.entries: dict[tuple[int, ...], Entry] = {}
        self.clock = 0
        self.hit = self.miss = 0
        self.running: list[Request] = []
        self.held: list[tuple[object, tuple[int, ...]]] = []  # locks from insert_with_node

    # ---- model helpers
    def model_match(self, tokens: list[int]) -> list[tuple[int, ...]]:
        ps, out = self.PAGE_SIZE, []
        while (len(out) + 1) * ps <= len(tokens) and tuple(tokens[: (len(out) + 1) * ps]) in self.entries:
            out.append(tuple(tokens[: len(out) * ps + ps]))
        return out

    def touch(self, prefixes: list[tuple[int, ...]]) -> None:
        for p in prefixes:
            self.entries[p].time = self.clock

    def relock(self, prefixes: list[tuple[int, ...]], delta: int) -> None:
        for p in prefixes:
            self.entries[p].locks += delta

    def full_prefixes(self, tokens: list[int]) -> list[tuple[int, ...]]:
        ps = self.PAGE_SIZE
        return [tuple(tokens[: k * ps]) for k in range(1, len(tokens) // ps + 1)]

    def match(self, tokens: list[int]) -> tuple[np.ndarray, object, list[tuple[int, ...]]]:
        expected = self.model_match(tokens)
        assert self.cache.peek_prefix(tokens) == len(expected) * self.PAGE_SIZE
        pages, node = self.cache.match_prefix(np.array(tokens, dtype=np.int32))
        self.clock += 1
        assert pages.tolist() == [self.entries[p].page for p in expected]
        self.touch(expected)
        self.hit += len(expected) * self.PAGE_SIZE
        self.miss += len(tokens) - len(expected) * self.PAGE_SIZE
        return pages, node, expected

    def insert(self, tokens: list[int], pages: np.ndarray, with_node: bool = False):
        full = self.full_prefixes(tokens)
        if with_node:
            present, node = self.cache.insert_with_node(tokens, pages)
        else:
            present, node = self.cache.insert(tokens, pages), None
        self.clock += 1
        expected = len(self.model_match(tokens))
        assert present == expected * self.PAGE_SIZE
        for k, p in enumerate(full[expected:], start=expected):
            self.entries[p] = Entry(int(pages[k]), self.clock)
        self.touch(full)
        return present, node

    def evict(self, n: int) -> int:
        ps = self.PAGE_SIZE
        evictable = sum(e.locks == 0 for e in self.entries.values())
        freed = self.cache.evict(n)
        event(f"evict freed {'nothing' if freed == 0 else 'pages'}")
        prefixes = list(self.entries)
        gone = self.alloc.is_free([self.entries[p].page for p in prefixes]) if prefixes else []
        removed = [p for p, g in zip(prefixes, gone) if g]
        assert freed == len(removed)
        assert all(self.entries[p].locks == 0 for p in removed), "evicted locked pages"
        assert freed >= min(n, evictable)
        times = [self.entries[p].time for p in removed]
        for p in removed:
            del self.entries[p]
        assert all(len(p) == ps or p[:-ps] in self.entries for p in self.entries)
        if removed:  # LRU: nothing evictable left is older, and no extra node was taken
            parents = {p[:-ps] for p in self.entries}
            leaves = [e for p, e in self.entries.items() if p not in parents and e.locks == 0]
            assert all(e.time >= max(times) for e in leaves)
            assert freed - times.count(max(times)) < n
        return freed

    def reserve(self, n: int) -> bool:
        if self.alloc.num_free < n:
            self.evict(n - self.alloc.num_free)
        return self.alloc.num_free >= n

    # ---- rules
    @rule(tokens=st.data())
    def match_only(self, tokens):
        self.match(tokens.draw(sequences(self.PAGE_SIZE)))

    @rule(data=st.data())
    def insert_fresh(self, data):
        tokens = data.draw(sequences(self.PAGE_SIZE))
        n = len(tokens) // self.PAGE_SIZE
        if not self.reserve(n):
            return
        pages = self.alloc.alloc(n)
        present, _ = self.insert(tokens, pages)
        self.alloc.free(pages[: present // self.PAGE_SIZE])

    @rule(data=st.data())
    def begin_request(self, data):
        tokens = data.draw(sequences(self.PAGE_SIZE))
        prefix, node, matched = self.match(tokens[:-1])
        self.cache.lock(node)
        self.relock(matched, +1)
        need = -(-len(tokens) // self.PAGE_SIZE) - len(prefix)
        if not self.reserve(need):
            self.cache.unlock(node)
            self.relock(matched, -1)
            return
        self.running.append(Request(tokens, prefix, self.alloc.alloc(need), node, matched))

    @precondition(lambda self: self.running)
    @rule(data=st.data(), keep_lock=st.booleans())
    def finish_request(self, data, keep_lock):
        req = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        ps = self.PAGE_SIZE
        pages = np.concatenate([req.prefix, req.own])
        full = len(req.tokens) // ps
        present, node = self.insert(req.tokens, pages[:full], with_node=keep_lock)
        assert present // ps >= len(req.prefix)
        if present // ps > len(req.prefix):
            event("finish: another request cached part of this one meanwhile")
        self.alloc.free(pages[len(req.prefix) : present // ps])
        self.alloc.free(pages[full:])
        if keep_lock:  # chunked-prefill style: hold the new node, drop the old one
            self.cache.lock(node)
            self.relock(self.full_prefixes(req.tokens), +1)
            self.held.append((node, tuple(req.tokens)))
        self.cache.unlock(req.node)
        self.relock(req.matched, -1)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        node, tokens = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.cache.unlock(node)
        self.relock(self.full_prefixes(list(tokens)), -1)

    @rule(n=st.integers(0, 12))
    def evict_some(self, n):
        self.evict(n)

    @rule()
    def flush(self):
        self.evict(self.cache.evictable_pages)
        assert all(e.locks > 0 for e in self.entries.values())

    # ---- invariants
    @invariant()
    def accounting(self):
        private = sum(len(r.own) for r in self.running)
        c = self.cache
        assert c.free_pages + c.evictable_pages + c.locked_pages + private == c.total_pages
        assert c.evictable_pages == sum(e.locks == 0 for e in self.entries.values())
        assert c.locked_pages == sum(e.locks > 0 for e in self.entries.values())
        cached = [e.page for e in self.entries.values()]
        owned = [int(p) for r in self.running for p in r.own]
        assert len(set(cached + owned)) == len(cached) + len(owned)
        assert not self.alloc.is_free(np.array(cached + owned, dtype=np.int64)).any()
        assert (c.hit_tokens, c.miss_tokens) == (self.hit, self.miss)
        assert sum(row.num_pages for row in export_tree(c)) == len(cached)
        # shared prefixes: the cached page prefixes that two or more cached sequences extend
        ps = self.PAGE_SIZE
        extensions = collections.Counter(p[:-ps] for p in self.entries if len(p) > ps)
        branches = [len(p) for p, k in extensions.items() if k >= 2]
        assert c.shared_nodes == len(branches)
        assert c.mean_shared_depth == (sum(branches) / len(branches) if branches else 0.0)

    def teardown(self):
        for req in self.running:
            self.cache.unlock(req.node)
            self.alloc.free(req.own)
        for node, _ in self.held:
            self.cache.unlock(node)
        self.cache.flush()
        assert self.cache.free_pages == self.cache.total_pages


class RadixModelPage16(RadixModelMachine):
    PAGE_SIZE = 16


_settings = settings(max_examples=120, stateful_step_count=30, deadline=None)
TestRadixAgainstModelPage1 = RadixModelMachine.TestCase
TestRadixAgainstModelPage1.settings = _settings
TestRadixAgainstModelPage16 = RadixModelPage16.TestCase
TestRadixAgainstModelPage16.settings = _settings


# ---------------------------------------------------------------- hand-built scenarios


def cache_with(page_size: int = 1, num_pages: int = 64) -> RadixCache:
    return RadixCache(PageAllocator(num_pages), page_size)


def put(cache: RadixCache, tokens: list[int]) -> np.ndarray:
    """Insert ``tokens`` with fresh pages, freeing duplicates like a caller would."""
    pages = cache.allocator.alloc(len(tokens) // cache.page_size)
    present = cache.insert(tokens, pages)
    cache.allocator.free(pages[: present // cache.page_size])
    return pages


def test_eviction_is_lru_by_last_access_and_parents_follow_children():
    cache = cache_with()
    put(cache, [1, 2, 3, 4])  # t=1
    put(cache, [1, 2, 5, 6])  # t=2, splits [1, 2] off
    put(cache, [9])  # t=3
    cache.match_prefix([1, 2, 5, 6])  # t=4: [1, 2] and [5, 6] are now the newest
    cache.match_prefix([8])  # t=5, misses: changes nothing
    assert [cache.peek_prefix(t) for t in ([1, 2, 3, 4], [1, 2, 5, 6], [9])] == [4, 4, 1]

    assert cache.evict(1) == 2  # the whole [3, 4] leaf, the oldest
    assert [cache.peek_prefix(t) for t in ([1, 2, 3, 4], [1, 2, 5, 6], [9])] == [2, 4, 1]
    assert cache.evict(1) == 1  # [9] (t=3) before [5, 6] (t=4)
    assert cache.peek_prefix([9]) == 0
    assert cache.evict(1) == 2  # [5, 6]; [1, 2] becomes a leaf but 2 >= 1 pages suffice
    assert cache.peek_prefix([1, 2, 5, 6]) == 2
    assert cache.evict(5) == 2  # the parent [1, 2] goes last
    assert cache.evictable_pages == 0 and cache.free_pages == cache.total_pages


def test_lru_order_holds_after_repeated_touches_locks_and_heap_rebuilds():
    cache = cache_with(page_size=2, num_pages=32)
    for first in range(6):  # t=1..6, six one-page leaves under the root
        put(cache, [first, first])
    for _ in range(100):  # far more touches than nodes: stale heap entries pile up
        for first in (0, 1, 2):
            _, node = cache.match_prefix([first, first])
            cache.lock(node)
            cache.unlock(node)
            cache.lock(node)  # lock / unlock without a touch: duplicate entries
            cache.unlock(node)
    order = []
    while cache.evictable_pages:
        before = {f for f in range(6) if cache.peek_prefix([f, f])}
        assert cache.evict(1) == 1
        order += sorted(before - {f for f in range(6) if cache.peek_prefix([f, f])})
    assert order == [3, 4, 5, 0, 1, 2]


def test_locked_path_survives_evict_and_flush_until_unlocked():
    cache = cache_with(page_size=2)
    put(cache, [1, 1, 2, 2, 3, 3])
    put(cache, [1, 1, 4, 4])
    pages, node = cache.match_prefix([1, 1, 2, 2, 3])  # ends mid page: 2 pages match
    assert len(pages) == 2
    cache.lock(node)
    assert (cache.locked_pages, cache.evictable_pages) == (2, 2)  # [3,3] and [4,4] evictable
    assert cache.evict(100) == 2 and cache.flush() == 0
    assert cache.peek_prefix([1, 1, 2, 2, 3, 3]) == 4
    cache.lock(node)  # locks are counted
    cache.unlock(node)
    assert cache.flush() == 0
    cache.unlock(node)
    assert cache.flush() == 2
    assert cache.free_pages == cache.total_pages
    with pytest.raises(RuntimeError, match="not in this cache"):
        cache.lock(node)


def test_handle_stays_valid_when_its_edge_is_split():
    cache = cache_with(page_size=4)
    put(cache, list(range(16)))
    pages, node = cache.match_prefix(list(range(16)))
    cache.lock(node)
    short, upper = cache.match_prefix(list(range(8)))  # splits the locked edge
    assert short.tolist() == pages[:2].tolist() and upper is not node
    assert cache.locked_pages == 4
    cache.unlock(node)
    assert (cache.locked_pages, cache.evictable_pages) == (0, 4)
    with pytest.raises(RuntimeError, match="not locked"):
        cache.unlock(node)


def test_insert_reports_present_prefix_and_returns_last_node():
    cache = cache_with(page_size=2)
    first = put(cache, [5, 5, 6, 6, 7])  # tail token 7 ignored
    assert len(first) == 2 and cache.peek_prefix([5, 5, 6, 6, 7, 7]) == 4
    own = cache.allocator.alloc(3)
    present, node = cache.insert_with_node([5, 5, 6, 6, 8, 8], own)
    assert present == 4
    cache.allocator.free(own[:2])
    pages, matched = cache.match_prefix([5, 5, 6, 6, 8, 8])
    assert matched is node and pages.tolist() == [*first.tolist(), own[2]]
    assert cache.insert([5], []) == 0  # shorter than a page: nothing to cache
    with pytest.raises(ValueError, match="expected len\\(tokens\\) // page_size = 2"):
        cache.insert([1, 2, 3, 4], [1])


def test_hit_rate_counts_tokens_passed_to_match():
    cache = cache_with(page_size=2)
    put(cache, [1, 2, 3, 4])
    cache.match_prefix([1, 2, 3, 4, 5])  # 4 hit, 1 miss
    cache.match_prefix([1, 2, 9])  # 2 hit, 1 miss
    cache.peek_prefix([1, 2])  # not counted
    assert (cache.hit_tokens, cache.miss_tokens) == (6, 2)
    assert cache.hit_rate == pytest.approx(0.75)
    assert cache.stats()["hit_rate"] == pytest.approx(0.75)


def test_export_and_pretty_describe_the_tree():
    cache = cache_with(page_size=2)
    put(cache, [1, 1, 2, 2, 3, 3])
    put(cache, [1, 1, 4, 4])
    _, node = cache.match_prefix([1, 1, 4, 4])
    cache.lock(node)
    rows = export_tree(cache, head=2)
    assert rows[0].parent_id is None and rows[0].num_tokens == 0
    by_id = {r.id: r for r in rows}
    shape = sorted((r.start_token, r.num_tokens, r.num_pages, r.head_tokens, r.lock_ref)
                   for r in rows[1:])
    assert shape == [(0, 2, 1, (1, 1), 1), (2, 2, 1, (4, 4), 1), (2, 4, 2, (2, 2), 0)]
    for r in rows[1:]:
        parent = by_id[r.parent_id]
        assert r.start_token == parent.start_token + parent.num_tokens
    text = pretty_tree(cache)
    assert text.splitlines()[0].startswith("root: ")
    assert "[4, 4] 2 tok, 1 pg" in text and "locked x1" in text
    assert len(text.splitlines()) == 4
    assert pretty_tree(cache, max_nodes=1).endswith("... 2 more nodes")


def test_disabled_cache_never_matches_and_hands_every_page_back():
    alloc = PageAllocator(16)
    cache = NoRadixCache(alloc, page_size=4)
    for _ in range(2):
        prefix, node = cache.match_prefix(list(range(10)))
        assert len(prefix) == 0 and cache.peek_prefix(list(range(10))) == 0
        cache.lock(node)
        own = alloc.alloc(3)  # 10 tokens: 2 whole pages + a partial one
        present = cache.insert(list(range(10)), own[:2])
        assert present == 8
        alloc.free(own[len(prefix) : present // 4])  # the generic caller code
        alloc.free(own[2:])
        cache.unlock(node)
    assert cache.free_pages == cache.total_pages == 15
    assert cache.evictable_pages == cache.locked_pages == 0 and cache.evict(4) == 0
    assert (cache.hit_tokens, cache.miss_tokens) == (0, 20)


def test_bench_script_runs_quick():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_radix.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| 1") or line.startswith("| 16")]
    assert len(rows) == 4 and all(line.count("us") == 5 for line in rows)
