"""RadixCache against a brute-force model, plus hand-built LRU and interface checks.

The model is a dict from every cached page-aligned prefix (a tuple of tokens) to the page
holding its last page, its LRU time and its lock count. It knows nothing of edges,
splits or heaps; eviction is checked against what LRU over that dict allows.
"""

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxserve.memory import NoRadixCache, PageAllocator, RadixCache

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
        assert sum(row.num_pages for row in c.export()) == len(cached)

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
