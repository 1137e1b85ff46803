"""`--disable-radix-cache`: a radix cache that never keeps anything."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxserve.memory.radix_cache import _EMPTY_PAGES, RadixCache, RadixNode

__all__ = ["NoRadixCache"]


class NoRadixCache(RadixCache):
    """``--disable-radix-cache``: the same interface over a tree that stays empty.

    ``match_prefix`` never matches (and counts every token as a miss); ``insert`` keeps
    nothing and reports every whole page as already present, so the caller's usual
    "free my pages in ``[len(matched), present // page_size)``" frees all of them. The
    node handed out is the root, for which ``lock`` / ``unlock`` are no-ops; ``evict``
    and ``flush`` free nothing. At idle ``free_pages == total_pages``.
    """

    def match_prefix(self, tokens: np.ndarray | Sequence[int]) -> tuple[np.ndarray, RadixNode]:
        self.miss_tokens += len(tokens)
        self._root.hits += 1
        return _EMPTY_PAGES, self._root

    def peek_prefix(self, tokens: np.ndarray | Sequence[int]) -> int:
        return 0

    def insert_with_node(self, tokens: np.ndarray | Sequence[int],
                         pages: np.ndarray | Sequence[int]) -> tuple[int, RadixNode]:
        return len(self._check_pages(len(tokens), pages)) * self.page_size, self._root
