"""PageBook: who owns which KV page, and every change of owner.

Every usable page is in exactly one place: free in the allocator, in the radix cache
(locked by a running request or a session, or evictable), or private to one running
request (`req.pages[num_cache_pages:num_pages]`). The scheduler never moves a page
itself; it calls the four methods here:

- `take_prefix(req)`: the cached prefix of `req` becomes its (locked) first pages;
- `grow(req, num_tokens)`: private pages until `num_tokens` tokens fit, evicting
  unlocked cache entries (and then unpinning idle sessions) when the free list is short;
- `cache_progress(req, computed)`: whole pages of a prefill in progress enter the cache, so
  requests admitted meanwhile share them;
- `release(req, how)`: the one function that gives a request's pages back. `how` is
  `"finish"` (the computed prefix goes to the cache; a finished session turn pins it),
  `"cache"` (the same, nothing pinned: retraction, abort) or `"drop"` (the KV is not
  trusted, e.g. after a failed step: nothing enters the cache).

At idle, free + evictable + locked == total, always (tests check it after every scenario).
Sessions pin their conversation, but at most `max_session_pages` pages in all, and a
pinned conversation is unpinned (becomes evictable) when memory runs short rather than
blocking the queue; its next turn then recomputes what was evicted.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from jaxserve.memory import NoRadixCache, PageAllocator, RadixCache
from jaxserve.scheduler.request import Request

logger = logging.getLogger(__name__)


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class PageBook:
    def __init__(self, cache: RadixCache, allocator: PageAllocator, runner, *, max_session_pages: int,
                 hicache=None):
        self.cache = cache
        self.hicache = hicache  # memory.HiCache: the host and storage tiers, or None
        self.allocator = allocator
        self.runner = runner  # writes page-table rows on the device
        self.page_size = cache.page_size
        self.max_session_pages = max_session_pages
        self.pins: OrderedDict[object, tuple[object, int]] = OrderedDict()  # session -> (node, pages), LRU first
        self.pinned_pages = 0

    # ---- free memory ----

    @property
    def available(self) -> int:
        """Pages that `reserve` can make free right now."""
        return self.cache.free_pages + self.cache.evictable_pages + self.pinned_pages

    def reserve(self, num_pages: int) -> bool:
        """Make `num_pages` free: evict unlocked cache pages, then unpin sessions (LRU)."""
        while True:
            short = num_pages - self.allocator.num_free
            if short <= 0:
                return True
            evicted = self.cache.evict(short)
            if evicted:
                logger.debug("radix eviction: %d pages freed (%d were short)", evicted, short)
            if self.allocator.num_free >= num_pages or not self.pins:
                return self.allocator.num_free >= num_pages
            self.unpin(next(iter(self.pins)))

    # ---- the four moves ----

    def take_prefix(self, req: Request) -> int:
        """Lock the longest cached prefix of `req` as its first pages; returns its tokens.
        With the hierarchical cache, a prefix part on the host is loaded back first
        (`req.loaded_tokens`), or computed when it cannot be."""
        req.loaded_tokens = 0
        if self.hicache is None:
            pages, node = self.cache.match_prefix(req.tokens[: req.match_limit()])
            self.cache.lock(node)
        else:
            match = self.cache.match_tiers(req.tokens[: req.match_limit()])
            pages, node = match.pages, match.node
            self.cache.lock(node)
            if match.host_nodes:
                req.loaded_tokens = self.hicache.load(self, match.host_nodes)
                if req.loaded_tokens:
                    node = match.host_nodes[-1]
                    self.cache.lock(node)
                    self.cache.unlock(match.node)
                    pages = self.cache.path_pages(node)
        req.node, req.num_pages, req.num_cache_pages = node, 0, len(pages)
        req.grow_pages(pages)
        return len(pages) * self.page_size

    def grow(self, req: Request, num_tokens: int) -> np.ndarray | None:
        """Private pages so that `num_tokens` tokens fit; the new pages, or None (nothing
        allocated) when memory is short."""
        need = pages_for(num_tokens, self.page_size) - req.num_pages
        if need <= 0:
            return _NO_PAGES
        if not self.reserve(need):
            return None
        new = self.allocator.alloc(need)
        req.grow_pages(new)
        return new

    def cache_progress(self, req: Request, computed: int) -> None:
        """Insert the whole pages of the first `computed` tokens of a prefill in progress
        (written by launched steps: every later reader runs after them); the request's
        lock moves to the new node. Pages another request cached meanwhile (same tokens, same KV)
        replace ours in the request's page table, and ours are freed."""
        full = computed // self.page_size
        if isinstance(self.cache, NoRadixCache) or full <= req.num_cache_pages:
            return
        pages = req.pages[:full]
        _, node = self.cache.insert_with_node(req.token_buf[: full * self.page_size], pages)
        self.cache.lock(node)
        self.cache.unlock(req.node)
        cached = self.cache.path_pages(node)  # [full]
        duplicate = pages != cached
        if duplicate.any():
            self.allocator.free(pages[duplicate])
            req.pages[:full] = cached
            self.runner.write_page_row(req.row, req.live_pages)
        req.node, req.num_cache_pages = node, full

    def release(self, req: Request, how: str) -> None:
        """Give back every page `req` holds (see the module doc for `how`)."""
        pages, page_size = req.live_pages, self.page_size
        own = pages[req.num_cache_pages :]
        if how == "drop":
            self.allocator.free(own)
            self.cache.unlock(req.node)
        else:
            full = req.num_computed // page_size
            present, node = self.cache.insert_with_node(req.token_buf[: full * page_size], pages[:full])
            # Our pages before `present` duplicate what another request cached meanwhile;
            # those after it now belong to the cache; a partial tail page is not cached.
            first_dup = req.num_cache_pages
            self.allocator.free(pages[first_dup : max(present // page_size, first_dup)])
            self.allocator.free(pages[full:])
            if how == "finish" and req.session is not None and not req.session.closed:
                self.pin(req.session, node, full)
            self.cache.unlock(req.node)
        req.node, req.num_pages, req.num_cache_pages, req.num_computed = None, 0, 0, 0

    # ---- sessions ----

    def pin(self, session, node, num_pages: int) -> None:
        """Keep `session`'s conversation (ending at `node`) cached until it is unpinned."""
        self.unpin(session)
        if num_pages == 0 or num_pages > self.max_session_pages:
            return
        self.cache.lock(node)
        self.pins[session] = (node, num_pages)
        self.pinned_pages += num_pages
        while self.pinned_pages > self.max_session_pages:
            self.unpin(next(iter(self.pins)))

    def unpin(self, session) -> None:
        pinned = self.pins.pop(session, None)
        if pinned is not None:
            node, num_pages = pinned
            self.cache.unlock(node)
            self.pinned_pages -= num_pages

    def drop_all_pins(self) -> None:
        for session in list(self.pins):
            self.unpin(session)


_NO_PAGES = np.zeros(0, np.int32)
_NO_PAGES.setflags(write=False)
