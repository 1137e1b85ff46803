"""Host-side free list over the pages of the device KV pool.

Page 0 is the reserved dummy page that padded tokens of the jitted step write to, so it
is never handed out. Pages ``1 .. num_pages - 1`` are the usable ones.

The free list is a preallocated int32 stack (``alloc`` pops from the top, ``free``
pushes), so both are O(n) numpy operations without Python loops over pages. A boolean
mask beside it catches double frees, which would otherwise silently hand one page to two
requests and corrupt their KV.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["OutOfPagesError", "PageAllocator", "PageFreeError"]


class OutOfPagesError(RuntimeError):
    """``alloc(n)`` asked for more pages than are free. Check ``num_free`` first (and
    evict from the radix cache) to avoid it."""


class PageFreeError(ValueError):
    """``free`` got a page that is not allocated: a double free, page 0 or out of range."""


class PageAllocator:
    """Free list over pages ``1 .. num_pages - 1`` of a KV pool of ``num_pages`` pages.

    ``alloc(n)`` raises :class:`OutOfPagesError` when fewer than ``n`` pages are free
    (it never returns a partial result); callers check :attr:`num_free` first. A fresh
    allocator hands out pages in increasing order (1, 2, 3, ...), which keeps tests and
    debugging output readable.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the dummy page), got {num_pages}")
        self._num_pages = int(num_pages)
        # Stack of free pages; the live part is _stack[:_top], the top is the end. Stored
        # in decreasing order so the first pops give 1, 2, 3, ...
        self._stack = np.arange(num_pages - 1, 0, -1, dtype=np.int32)  # [num_pages - 1]
        self._top = num_pages - 1
        self._is_free = np.ones(num_pages, dtype=bool)  # [num_pages]
        self._is_free[0] = False
        # Scratch for duplicate detection inside one free() call (see free()).
        self._stamp = np.zeros(num_pages, dtype=np.int64)  # [num_pages]

    @property
    def num_pages(self) -> int:
        """Size of the pool including the dummy page 0."""
        return self._num_pages

    @property
    def num_free(self) -> int:
        """Pages that ``alloc`` can hand out right now."""
        return self._top

    @property
    def num_used(self) -> int:
        """Usable pages currently allocated (held by requests or by the radix cache)."""
        return self._num_pages - 1 - self._top

    def alloc(self, n: int) -> np.ndarray:
        """Take ``n`` free pages. Returns ``int32[n]``; raises :class:`OutOfPagesError`
        (allocating nothing) when fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > self._top:
            raise OutOfPagesError(
                f"asked for {n} KV pages but only {self._top} of {self._num_pages - 1} are free"
            )
        start = self._top - n
        pages = self._stack[start : self._top][::-1].copy()  # [n]
        self._top = start
        self._is_free[pages] = False
        return pages

    def free(self, pages: np.ndarray | Sequence[int]) -> None:
        """Return ``pages`` to the free list. Validates all of them first, so on error
        nothing is freed: out of range, page 0, already free, or listed twice."""
        pages = np.asarray(pages, dtype=np.int64).reshape(-1)  # [n]
        n = pages.size
        if n == 0:
            return
        bad = (pages < 1) | (pages >= self._num_pages)
        if bad.any():
            raise PageFreeError(
                f"cannot free page(s) {pages[bad][:8].tolist()}: valid pages are "
                f"1..{self._num_pages - 1} (page 0 is the reserved dummy page)"
            )
        already = self._is_free[pages]
        if already.any():
            raise PageFreeError(f"double free of page(s) {pages[already][:8].tolist()}")
        # Duplicates within this call, in O(n): with repeated indices, fancy assignment
        # keeps the last write, so an earlier copy of a page reads back a different stamp.
        order = np.arange(n, dtype=np.int64)
        self._stamp[pages] = order
        dup = self._stamp[pages] != order
        if dup.any():
            raise PageFreeError(f"page(s) {np.unique(pages[dup])[:8].tolist()} freed twice in one call")
        self._is_free[pages] = True
        self._stack[self._top : self._top + n] = pages[::-1]
        self._top += n

    def is_free(self, pages: np.ndarray | Sequence[int]) -> np.ndarray:
        """``bool[n]``: whether each of ``pages`` is currently free (for tests and checks)."""
        return self._is_free[np.asarray(pages, dtype=np.int64)]
