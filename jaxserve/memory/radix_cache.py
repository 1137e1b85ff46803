"""Radix tree from token prefixes to KV pages (RadixAttention prefix sharing).

Keys are token ids stored as the raw bytes of an int32 array, so comparing an edge is a
``memcmp`` and a child lookup hashes one page worth of bytes. Only whole pages are
cached: every edge holds a multiple of ``page_size`` tokens and one page index per
``page_size`` tokens. Children are keyed by the bytes of their first page, which is
unique among siblings because a shared first page would have been one edge.

Page accounting. Every usable page (``1 .. num_pages - 1``) is in exactly one place:
free in the allocator (``free_pages``); in the tree on an unlocked node
(``evictable_pages``) or a locked one (``locked_pages``); or private to a caller
(allocated and not yet given to the tree by ``insert``, or a duplicate that ``insert``
reported as present and the caller has not freed yet). So ``free + evictable + locked +
private == total_pages`` always, and ``free + evictable + locked == total`` at idle.

Protocol for a caller (the scheduler) serving one request::

    prefix, node = cache.match_prefix(tokens[:-1])  # reuse all but >= 1 token
    cache.lock(node)                                # before allocating anything else
    own = allocator.alloc(pages_needed)             # private pages for the rest
    ...                                             # prefill / decode into them
    pages = np.concatenate([prefix, own])           # [ceil(kv_len / page_size)]
    full = kv_len // page_size                      # kv_len: tokens whose KV is written
    present = cache.insert(tokens[:kv_len], pages[:full])
    allocator.free(pages[len(prefix) : present // page_size])  # cached meanwhile
    allocator.free(pages[full:])                    # a partial tail page is not cached
    cache.unlock(node)

Pages from ``match_prefix`` belong to the cache: never free them. ``insert`` takes the
caller's pages after ``present``; the caller's own pages before it duplicate pages that
another request cached meanwhile, so the caller frees them. The same code works with
:class:`NoRadixCache`, whose ``insert`` reports every whole page as present.

Time for LRU is a counter bumped by every ``match_prefix`` and ``insert`` (not a wall
clock), so eviction order is deterministic. Each node also counts its ``hits``: the
``match_prefix`` calls whose match reached into it (the root counts every call), bumped
on the path walk that refreshes the LRU time anyway.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from collections.abc import Sequence

import numpy as np

from jaxserve.memory.allocator import PageAllocator

__all__ = ["RadixCache", "RadixNode", "token_key"]

_TOKEN_BYTES = 4  # keys are int32 token ids
_EMPTY_PAGES = np.zeros(0, dtype=np.int32)
_EMPTY_PAGES.setflags(write=False)


def _head(pages, n: int):
    return None if pages is None else pages[:n]


def _tail(pages, n: int):
    return None if pages is None else pages[n:]


def token_key(tokens: np.ndarray | Sequence[int]) -> bytes:
    """Token ids as the int32 bytes used for keys. An int32 numpy array is the fast path
    (a 0.2 us copy); a list costs one ``struct.pack`` (15-40 us per 2k tokens)."""
    if isinstance(tokens, np.ndarray):
        return tokens.astype(np.int32, copy=False).tobytes()
    return struct.pack(f"{len(tokens)}i", *tokens)


class RadixNode:
    """One edge of the tree and the node below it. Callers treat it as an opaque handle
    for ``lock`` / ``unlock``; a handle stays valid across splits (the handle keeps the
    lower part of a split edge, so it always ends where it ended before)."""

    __slots__ = ("id", "parent", "children", "key", "pages", "lock_ref", "last_access", "hits", "host", "hkeys",
                 "writing")

    def __init__(self, node_id: int, parent: RadixNode | None, key: bytes, pages: np.ndarray,
                 last_access: int) -> None:
        self.id = node_id
        self.parent = parent  # None for the root and for nodes evicted from the tree
        self.children: dict[bytes, RadixNode] = {}
        self.key = key  # int32 bytes of this edge's tokens, a whole number of pages
        self.pages = pages  # [len(key) // page_bytes] int32
        self.lock_ref = 0
        self.last_access = last_access
        self.hits = 0  # match_prefix calls that matched into this node (the root: every call)
        # The hierarchical cache (hiradix_cache.py): `pages` is None when the KV is only
        # on the host; `host` the host pages, `hkeys` the storage keys, `writing` a
        # device-to-host copy in flight.
        self.host: np.ndarray | None = None
        self.hkeys: list[str] | None = None
        self.writing = None

    def __repr__(self) -> str:
        return f"RadixNode(id={self.id}, pages={len(self.pages)}, lock_ref={self.lock_ref})"


class RadixCache:
    """Radix tree of cached prefixes whose values are KV page indices (see module doc)."""

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.allocator = allocator
        self.page_size = int(page_size)
        self._page_bytes = self.page_size * _TOKEN_BYTES
        self._ids = itertools.count()
        self._clock = 0
        self._root = RadixNode(next(self._ids), None, b"", _EMPTY_PAGES, 0)
        self._nodes: dict[int, RadixNode] = {}  # every node but the root, by id
        self._evictable_pages = 0
        self._locked_pages = 0
        # Min-heap of (last_access, id, node) holding every unlocked leaf, plus stale
        # entries. Ids are unique, so no two different nodes' entries compare their nodes.
        self._heap: list[tuple[int, int, RadixNode]] = []
        self.hit_tokens = 0
        self.miss_tokens = 0
        # Shared prefixes: nodes (not the root) with two or more children, and the sum of
        # their depths in tokens; kept up to date by `_attach` / `_detach`.
        self.shared_nodes = 0
        self._shared_depth = 0

    # ----------------------------------------------------------------- lookup / insert

    def match_prefix(self, tokens: np.ndarray | Sequence[int]) -> tuple[np.ndarray, RadixNode]:
        """Longest cached prefix of ``tokens`` in whole pages.

        Returns ``(pages, node)``: ``pages`` is ``int32[k]`` for the first
        ``k * page_size`` tokens, ``node`` the handle to ``lock`` (the root when nothing
        matched). Splits an edge when the match ends inside it, refreshes the LRU time of
        the matched path and counts hit / miss tokens. Pass only the tokens you are
        willing to reuse (e.g. all but the last, so at least one is computed).
        """
        key = token_key(tokens)
        self._clock += 1
        node, matched = self._descend(key, split=True)
        path = self._touch(node, hit=True)
        num_tokens = len(key) // _TOKEN_BYTES
        hit = matched // _TOKEN_BYTES
        self.hit_tokens += hit
        self.miss_tokens += num_tokens - hit
        if not path:
            return _EMPTY_PAGES, node
        if len(path) == 1:
            return path[0], node
        return np.concatenate(path[::-1]), node

    def peek_prefix(self, tokens: np.ndarray | Sequence[int]) -> int:
        """Number of leading tokens of ``tokens`` that are cached. Read-only: no split, no
        LRU refresh, no hit counting (for scheduling policies that rank requests)."""
        _, matched = self._descend(token_key(tokens), split=False)
        return matched // _TOKEN_BYTES

    def insert(self, tokens: np.ndarray | Sequence[int], pages: np.ndarray | Sequence[int]) -> int:
        """Cache the whole pages of ``tokens`` (``len(pages) == len(tokens) // page_size``;
        a partial tail page is ignored). Returns how many leading tokens were already
        cached: the cache keeps its own pages there, so the caller frees its duplicates in
        that range; the caller's pages after it now belong to the cache."""
        return self.insert_with_node(tokens, pages)[0]

    def insert_with_node(self, tokens: np.ndarray | Sequence[int],
                         pages: np.ndarray | Sequence[int]) -> tuple[int, RadixNode]:
        """:meth:`insert` that also returns the node ending at the last whole page (the
        root when ``tokens`` is shorter than a page), e.g. to lock it for chunked
        prefill."""
        key = token_key(tokens)
        pages = self._check_pages(len(key) // _TOKEN_BYTES, pages)  # [num_full]
        key = key[: len(pages) * self._page_bytes]
        self._clock += 1
        node, pos = self._descend(key, split=True)
        self._touch(node)
        if pos < len(key):
            own = pages[pos // self._page_bytes :].copy()  # [num_full - pos / page_bytes]
            own.setflags(write=False)  # match_prefix hands out views of it
            leaf = RadixNode(next(self._ids), node, key[pos:], own, self._clock)
            self._attach(leaf)
            self._evictable_pages += len(leaf.pages)
            self._offer(leaf)
            node = leaf
        return pos // _TOKEN_BYTES, node

    def path_pages(self, node: RadixNode) -> np.ndarray:
        """The pages from the root down to ``node`` (the KV of the prefix it ends), without
        counting a hit or touching access times."""
        parts: list[np.ndarray] = []
        while node is not self._root:
            parts.append(node.pages)
            node = node.parent  # type: ignore[assignment]
        return np.concatenate(parts[::-1]) if parts else _EMPTY_PAGES

    def _touch(self, node: RadixNode, hit: bool = False) -> list[np.ndarray]:
        """Mark the path from the root to ``node`` as used now (and, for a ``hit``, count
        it on every node of the path); returns its page arrays from ``node`` up. Only
        ``node`` can be a leaf, so it alone is offered to the eviction heap under its new
        time."""
        path: list[np.ndarray] = []
        walk = node
        while walk is not self._root:
            walk.last_access = self._clock
            walk.hits += hit
            path.append(walk.pages)
            walk = walk.parent  # type: ignore[assignment]
        self._root.hits += hit
        self._offer(node)
        return path

    def _check_pages(self, num_tokens: int, pages: np.ndarray | Sequence[int]) -> np.ndarray:
        pages = np.asarray(pages, dtype=np.int32).reshape(-1)
        if len(pages) != num_tokens // self.page_size:
            raise ValueError(f"insert got {len(pages)} pages for {num_tokens} tokens; expected "
                             f"len(tokens) // page_size = {num_tokens // self.page_size}")
        return pages

    def _descend(self, key: bytes, split: bool) -> tuple[RadixNode, int]:
        """Walk down along ``key`` (cut to whole pages). Returns the deepest node whose
        path is a prefix of ``key`` and the matched length in bytes. With ``split``, an
        edge the match ends inside is split so that the returned node ends exactly at
        the match; without, the partial edge's matched pages are counted but not split."""
        pb = self._page_bytes
        end = len(key) - len(key) % pb
        node = self._root
        pos = 0
        while pos < end:
            child = node.children.get(key[pos : pos + pb])
            if child is None:
                break
            edge = child.key
            if key.startswith(edge, pos):
                node = child
                pos += len(edge)
                continue
            common = self._common_pages(edge, key, pos) * pb  # >= 1 page: the first matched
            if split:
                node = self._split(child, common)
            pos += common
            break
        return node, pos

    def _common_pages(self, edge: bytes, key: bytes, pos: int) -> int:
        """Whole pages shared by ``edge`` and ``key[pos:]`` (only called on a mismatch)."""
        n = min(len(edge), len(key) - pos) // _TOKEN_BYTES
        a = np.frombuffer(edge, dtype=np.int32, count=n)
        b = np.frombuffer(key, dtype=np.int32, count=n, offset=pos)
        diff = np.flatnonzero(a != b)
        first = int(diff[0]) if diff.size else n
        return first // self.page_size

    def _attach(self, leaf: RadixNode) -> None:
        """Hang a new leaf under its parent."""
        parent = leaf.parent
        parent.children[leaf.key[: self._page_bytes]] = leaf
        self._nodes[leaf.id] = leaf
        if len(parent.children) == 2 and parent is not self._root:
            self.shared_nodes += 1
            self._shared_depth += self.depth(parent)

    def _detach(self, node: RadixNode) -> None:
        """Take `node` off its parent (the caller drops it and its subtree from `_nodes`)."""
        parent = node.parent
        del parent.children[node.key[: self._page_bytes]]
        if len(parent.children) == 1 and parent is not self._root:
            self.shared_nodes -= 1
            self._shared_depth -= self.depth(parent)
        stack = [(node, self.depth(node))] if node.children else []  # (a leaf, as eviction takes, has none)
        while stack:  # shared nodes below it leave with it
            n, depth = stack.pop()
            if len(n.children) >= 2:
                self.shared_nodes -= 1
                self._shared_depth -= depth
            stack.extend((c, depth + len(c.key) // _TOKEN_BYTES) for c in n.children.values())

    def depth(self, node: RadixNode) -> int:
        """Tokens from the root to the end of `node`."""
        tokens = 0
        while node is not self._root:
            tokens += len(node.key) // _TOKEN_BYTES
            node = node.parent  # type: ignore[assignment]
        return tokens

    @property
    def mean_shared_depth(self) -> float:
        """The average length in tokens of the prefixes two or more cached sequences share
        (the depth of the nodes where they branch); 0 when none do."""
        return self._shared_depth / self.shared_nodes if self.shared_nodes else 0.0

    def _split(self, child: RadixNode, at: int) -> RadixNode:
        """Split ``child``'s edge after ``at`` bytes (a page boundary); the new upper node
        is returned and ``child`` keeps the lower part, so handles to it stay valid."""
        pb = self._page_bytes
        parent = child.parent
        assert parent is not None
        cut = at // pb
        upper = RadixNode(next(self._ids), parent, child.key[:at], _head(child.pages, cut), child.last_access)
        upper.lock_ref = child.lock_ref  # every lock covering child covers its prefix
        upper.hits = child.hits  # and so does every match that reached into it
        upper.host, upper.hkeys, upper.writing = _head(child.host, cut), _head(child.hkeys, cut), child.writing
        if child.writing is not None:
            child.writing.nodes.append(upper)  # the copy in flight now fills both halves
        parent.children[child.key[:pb]] = upper
        child.key = child.key[at:]
        child.pages, child.host, child.hkeys = (_tail(x, cut) for x in (child.pages, child.host, child.hkeys))
        child.parent = upper
        upper.children[child.key[:pb]] = child
        self._nodes[upper.id] = upper
        return upper

    # ----------------------------------------------------------------- locks / eviction

    def lock(self, node: RadixNode) -> None:
        """Pin ``node`` and its ancestors: their pages are never evicted until unlocked.
        Locks are counted, so several requests may lock the same path."""
        self._check_live(node)
        while node is not self._root:
            if node.lock_ref == 0:
                self._evictable_pages -= len(node.pages)
                self._locked_pages += len(node.pages)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: RadixNode) -> None:
        """Undo one :meth:`lock` of ``node``."""
        self._check_live(node)
        walk = node
        while walk is not self._root:  # validate first so a bad unlock changes nothing
            if walk.lock_ref <= 0:
                raise RuntimeError(f"unlock of {node!r} which is not locked")
            walk = walk.parent  # type: ignore[assignment]
        while node is not self._root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._locked_pages -= len(node.pages)
                self._evictable_pages += len(node.pages)
                self._offer(node)
            node = node.parent  # type: ignore[assignment]

    def _check_live(self, node: RadixNode) -> None:
        if node is not self._root and self._nodes.get(node.id) is not node:
            raise RuntimeError(f"{node!r} is not in this cache (evicted, flushed, or foreign)")

    def evict(self, num_pages: int) -> int:
        """Free at least ``num_pages`` pages (fewer only if not enough are evictable),
        least recently used unlocked leaves first. Whole nodes are evicted, so it may
        free more. Returns the number of pages given back to the allocator."""
        freed: list[np.ndarray] = []
        num_freed = 0
        while num_freed < num_pages and self._heap:
            last_access, _, node = heapq.heappop(self._heap)
            if not self._evictable_leaf(node) or node.last_access != last_access:
                continue  # stale entry: touched, locked, grown or evicted since pushed
            parent = node.parent
            assert parent is not None
            self._detach(node)
            del self._nodes[node.id]
            node.parent = None
            freed.append(node.pages)
            num_freed += len(node.pages)
            self._offer(parent)  # its time is >= its child's, so pops stay in LRU order
        if freed:
            self.allocator.free(np.concatenate(freed))
        self._evictable_pages -= num_freed
        return num_freed

    @staticmethod
    def _evictable_leaf(node: RadixNode) -> bool:
        return node.parent is not None and not node.children and node.lock_ref == 0

    def _offer(self, node: RadixNode) -> None:
        """Push ``node`` on the eviction heap if it is an unlocked leaf. Entries are not
        removed when a node changes; ``evict`` skips stale ones, and the heap is rebuilt
        from the live leaves when stale entries outnumber the nodes."""
        if not self._evictable_leaf(node):
            return
        heapq.heappush(self._heap, (node.last_access, node.id, node))
        if len(self._heap) > 2 * len(self._nodes) + 64:
            self._heap = [(n.last_access, n.id, n) for n in self._nodes.values()
                          if self._evictable_leaf(n)]
            heapq.heapify(self._heap)

    def flush(self) -> int:
        """Evict everything that is not locked. Returns the number of pages freed."""
        return self.evict(self._evictable_pages)

    # ----------------------------------------------------------------- accounting

    @property
    def free_pages(self) -> int:
        """Pages free in the allocator."""
        return self.allocator.num_free

    @property
    def evictable_pages(self) -> int:
        """Pages in the tree on unlocked nodes."""
        return self._evictable_pages

    @property
    def locked_pages(self) -> int:
        """Pages in the tree on locked nodes (a node is locked while any request on a
        path through it holds a lock)."""
        return self._locked_pages

    @property
    def total_pages(self) -> int:
        """Usable pages of the pool (all but the dummy page 0)."""
        return self.allocator.num_pages - 1

    @property
    def num_nodes(self) -> int:
        """Nodes in the tree, not counting the root."""
        return len(self._nodes)

    @property
    def hit_rate(self) -> float:
        """Fraction of tokens passed to ``match_prefix`` that were found cached."""
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0

    def stats(self) -> dict[str, float]:
        """Counters for logs and ``/metrics``."""
        names = ("hit_tokens", "miss_tokens", "hit_rate", "free_pages", "evictable_pages",
                 "locked_pages", "total_pages", "num_nodes")
        return {name: getattr(self, name) for name in names}

    @property
    def root(self) -> RadixNode:
        """The root node (for inspection: `radix_view.py`)."""
        return self._root

