"""HiRadixCache: the radix tree over two tiers, device pages and host pages.

A node's KV can be on the device (`pages`), on the host (`host`), or both. The nodes on
the device form a subtree around the root (a node on the device has its parent on the
device), so a match is a device part followed by a host-only part:
`match_tiers` returns both. Whoever admits the request loads the host part back
(`attach_device` once its pages are written), or computes it.

Device eviction takes an unlocked node none of whose children is on the device. A node
with a host copy loses only its device part; one without is removed with its host-only
subtree (`write_back` first starts a copy, so it keeps the node). Host eviction
(`evict_host`) removes least recently used host-only leaves, then drops host copies of
nodes that are also on the device.

Write policies (SGLang's): `write_through` starts a host copy of every new node when it
is inserted; `write_through_selective` once a node has been matched `SELECTIVE_HITS`
times; `write_back` only when the device evicts a node. Starting a copy is the job of
`backup`, a function the owner (`memory/hicache.py`) sets: it allocates host pages, sets
`node.host` and `node.writing` and returns whether it started. A copy in flight keeps
its host pages out of both eviction paths; `write_done` settles it.

Host accounting. Every usable host page is free, on a node with no copy in flight
(`host_evictable_pages`), or in a transfer in flight (counted by the owner). At idle the
owner's count is zero, so free + evictable == total.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxserve.memory.allocator import PageAllocator
from jaxserve.memory.radix_cache import RadixCache, RadixNode, token_key

SELECTIVE_HITS = 2  # write_through_selective backs a node up after this many matches
WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")
_TOKEN_BYTES = 4


class TierMatch(NamedTuple):
    pages: np.ndarray  # device pages of the prefix on the device
    node: RadixNode  # the deepest node on the device: lock it
    host_nodes: list[RadixNode]  # the host-only nodes below it, top down
    host_tokens: int


class HiRadixCache(RadixCache):
    def __init__(self, allocator: PageAllocator, page_size: int, host_allocator: PageAllocator,
                 write_policy: str = "write_through") -> None:
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"write policy must be one of {WRITE_POLICIES}, got {write_policy!r}")
        super().__init__(allocator, page_size)
        self.host_allocator = host_allocator
        self.write_policy = write_policy
        self.backup = lambda node: False  # set by the owner: start a host copy of `node`
        self.host_evictable_pages = 0
        self._guard = -1  # the LRU time of a matched path whose host part is being loaded

    # ---- matching and inserting ----

    def match_tiers(self, tokens: np.ndarray | Sequence[int]) -> TierMatch:
        """The longest cached prefix over both tiers (see the module doc); counts a hit
        like `match_prefix`."""
        key = token_key(tokens)
        self._clock += 1
        node, matched = self._descend(key, split=True)
        self._touch(node, hit=True)
        host_nodes: list[RadixNode] = []
        dev = node
        while dev.pages is None:
            host_nodes.append(dev)
            dev = dev.parent  # type: ignore[assignment]
        host_nodes.reverse()
        self._guard = self._clock if host_nodes else -1  # host eviction spares this path until `end_load`
        host_tokens = sum(len(n.key) for n in host_nodes) // _TOKEN_BYTES
        hit = matched // _TOKEN_BYTES - host_tokens
        self.hit_tokens += hit
        self.miss_tokens += len(key) // _TOKEN_BYTES - hit
        if self.write_policy == "write_through_selective":
            self._back_up_path(dev, lambda n: n.hits >= SELECTIVE_HITS)
        return TierMatch(self.path_pages(dev), dev, host_nodes, host_tokens)

    def match_prefix(self, tokens: np.ndarray | Sequence[int]) -> tuple[np.ndarray, RadixNode]:
        m = self.match_tiers(tokens)
        return m.pages, m.node

    def insert_with_node(self, tokens: np.ndarray | Sequence[int],
                         pages: np.ndarray | Sequence[int]) -> tuple[int, RadixNode]:
        """:meth:`RadixCache.insert_with_node`; host-only nodes on the path take the
        caller's pages (they hold the same KV), so only the device part counts as present."""
        key = token_key(tokens)
        pages = self._check_pages(len(key) // _TOKEN_BYTES, pages)
        key = key[: len(pages) * self._page_bytes]
        self._clock += 1
        node, pos = self._descend(key, split=True)
        walk, end = node, pos // self._page_bytes
        while walk.pages is None:  # revive the host-only part of the path
            start = end - len(walk.host)  # type: ignore[arg-type]
            walk.pages = _own(pages[start:end])
            self._evictable_pages += end - start
            walk, end = walk.parent, start  # type: ignore[assignment]
        present = end * self.page_size
        self._touch(node)
        if pos < len(key):
            leaf = RadixNode(next(self._ids), node, key[pos:], _own(pages[pos // self._page_bytes :]), self._clock)
            self._attach(leaf)
            self._evictable_pages += len(leaf.pages)
            self._offer(leaf)
            node = leaf
            if self.write_policy == "write_through":
                self._back_up_path(leaf, lambda n: True)
        return present, node

    def insert_host(self, tokens: np.ndarray, host_pages: np.ndarray, start_page: int,
                    keys: list[str]) -> int:
        """Add host pages read from storage for the whole pages `start_page ..` of
        `tokens` as a host-only leaf. Host pages the tree already has are freed, and all
        of them when the prefix before `start_page` is no longer cached. Returns the
        tokens added."""
        key = token_key(tokens)
        self._clock += 1
        node, pos = self._descend(key, split=True)
        have = pos // self._page_bytes - start_page  # of ours, already in the tree
        if have < 0:
            self.host_allocator.free(host_pages)
            return 0
        self.host_allocator.free(host_pages[:have])
        if pos == len(key):
            return 0
        leaf = RadixNode(next(self._ids), node, key[pos:], None, self._clock)  # type: ignore[arg-type]
        leaf.host, leaf.hkeys = _own(host_pages[have:]), list(keys[have:])
        self._attach(leaf)
        self.host_evictable_pages += len(leaf.host)
        self._touch(leaf)
        return (len(key) - pos) // _TOKEN_BYTES

    def attach_device(self, nodes: list[RadixNode], pages: np.ndarray) -> None:
        """`nodes` (a host-only chain, top down) are on the device again in `pages`."""
        at = 0
        for node in nodes:
            n = len(node.host)  # type: ignore[arg-type]
            node.pages = _own(pages[at : at + n])
            self._evictable_pages += n
            at += n
        self._offer(nodes[-1])

    def _back_up_path(self, node: RadixNode, want) -> None:
        """Start host copies of the device nodes from the root down to `node` that have
        none and pass `want`."""
        path = []
        while node is not self._root:
            path.append(node)
            node = node.parent  # type: ignore[assignment]
        for n in reversed(path):
            if n.host is None and n.writing is None and want(n):
                self.backup(n)

    # ---- device eviction ----

    def _evictable_leaf(self, node: RadixNode) -> bool:
        return (node.parent is not None and node.pages is not None and node.lock_ref == 0
                and not any(c.pages is not None for c in node.children.values()))

    def evict(self, num_pages: int) -> int:
        freed: list[np.ndarray] = []
        num_freed = 0
        while num_freed < num_pages and self._heap:
            last_access, _, node = heapq.heappop(self._heap)
            if not self._evictable_leaf(node) or node.last_access != last_access:
                continue
            if node.host is None and self.write_policy == "write_back":
                self.backup(node)  # dispatched before the pages can be reused
            parent = node.parent
            freed.append(node.pages)
            num_freed += len(node.pages)
            self._evictable_pages -= len(node.pages)
            node.pages = None  # type: ignore[assignment]
            if node.host is None:
                self._remove(node)
            self._offer(parent)  # type: ignore[arg-type]
        if freed:
            self.allocator.free(np.concatenate(freed))
        return num_freed

    def _remove(self, node: RadixNode) -> None:
        """Take `node` (device part already gone) and its host-only subtree out of the
        tree. Host pages under a copy in flight are freed when it settles."""
        self._detach(node)
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            del self._nodes[n.id]
            n.parent = None
            if n.host is not None and n.writing is None:
                self.host_allocator.free(n.host)
                self.host_evictable_pages -= len(n.host)
                n.host = None

    # ---- host side ----

    def write_done(self, nodes: list[RadixNode], ok: bool) -> None:
        """A copy in flight into `nodes`' host pages ended (`ok`: it succeeded)."""
        for node in nodes:
            node.writing = None
            live = self._nodes.get(node.id) is node
            if live and ok:
                self.host_evictable_pages += len(node.host)  # type: ignore[arg-type]
                continue
            self.host_allocator.free(node.host)  # type: ignore[arg-type]
            node.host = None
            if live and node.pages is None:
                self._remove(node)

    def evict_host(self, num_pages: int) -> int:
        """Free at least `num_pages` host pages if possible (LRU host-only leaves first,
        then host copies of device nodes; never a path being loaded). Returns the pages
        freed."""
        freed = 0
        leaves = [(n.last_access, n.id, n) for n in self._nodes.values() if self._host_leaf(n)]
        heapq.heapify(leaves)
        while freed < num_pages and leaves:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            freed += len(node.host)  # type: ignore[arg-type]
            self._remove(node)
            if parent is not self._root and self._host_leaf(parent):  # type: ignore[arg-type]
                heapq.heappush(leaves, (parent.last_access, parent.id, parent))  # type: ignore[union-attr]
        if freed < num_pages:
            copies = sorted((n for n in self._nodes.values() if n.pages is not None and n.host is not None
                             and n.writing is None and self._old(n)), key=lambda n: n.last_access)
            for node in copies:
                if freed >= num_pages:
                    break
                self.host_allocator.free(node.host)  # type: ignore[arg-type]
                self.host_evictable_pages -= len(node.host)  # type: ignore[arg-type]
                freed += len(node.host)  # type: ignore[arg-type]
                node.host = None
        return freed

    def _host_leaf(self, node: RadixNode) -> bool:
        return node.pages is None and node.writing is None and not node.children and self._old(node)

    def _old(self, node: RadixNode) -> bool:
        """Not on the path of the match whose host part is being loaded (see `end_load`)."""
        return node.last_access != self._guard

    def end_load(self) -> None:
        """The host part of the last match is loaded (or will be computed): host eviction
        may take its nodes again."""
        self._guard = -1

    def flush_host(self) -> int:
        """Drop every host page not in a transfer."""
        return self.evict_host(self.host_evictable_pages)

    def keys_of(self, node: RadixNode, namespace_keys) -> list[str]:
        """The storage keys of `node`'s pages (computed once: `namespace_keys(tokens,
        parent_key)` chains them from the parent's last key)."""
        if node.hkeys is None:
            parent = node.parent
            parent_key = None if parent is self._root else self.keys_of(parent, namespace_keys)[-1]  # type: ignore[arg-type]
            node.hkeys = namespace_keys(np.frombuffer(node.key, np.int32), parent_key)
        return node.hkeys

    def host_stats(self) -> dict[str, int]:
        return {"host_total_pages": self.host_allocator.num_pages - 1, "host_free_pages": self.host_allocator.num_free,
                "host_evictable_pages": self.host_evictable_pages,
                "device_and_host_nodes": sum(n.pages is not None and n.host is not None for n in self._nodes.values()),
                "host_only_nodes": sum(n.pages is None for n in self._nodes.values())}


def _own(pages: np.ndarray) -> np.ndarray:
    out = np.array(pages, dtype=np.int32)
    out.setflags(write=False)
    return out
