"""KV pages between the device pool and the host: the device half of a transfer.

A transfer never copies the whole pool. `gather(pages)` is a jitted gather of some pages
of the pool into a fresh device array; `scatter(pages, k, v)` a jitted scatter into the
donated pool. Both are dispatched on the scheduler thread between step programs, so the
device runs them in order with the steps: a gather sees the KV of every step launched
before it, and a page freed after its gather may be reused by the next step at once.
The host half (copying a gathered array to host memory, reading host pages) is the
caller's (`memory/hicache.py`), on a worker thread for writes.

A transfer is cut into power-of-two pieces (23 pages: 16 + 4 + 2 + 1), each a program
compiled at warm-up, so nothing is padded or copied twice and serving never compiles.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

MAX_TRANSFER_PAGES = 16  # the largest piece: larger ones make the CPU backend fault in fresh temporaries


def transfer_buckets(max_pages: int = MAX_TRANSFER_PAGES) -> list[int]:
    buckets, b = [], 1
    while b < max_pages:
        buckets.append(b)
        b *= 2
    return buckets + [max_pages]


class PageIO:
    """Gather / scatter of whole pages of `runner`'s KV pool (see the module doc): it reads
    and replaces `runner.k_cache`, `v_cache` and `bounds` (the pages' key bounds with sparse
    attention, else None). `max_pages` (a power of two) is the largest piece."""

    def __init__(self, runner, max_pages: int = MAX_TRANSFER_PAGES):
        self.runner = runner
        self.buckets = transfer_buckets(max_pages)

    def pieces(self, n: int) -> list[tuple[int, int]]:
        """`(start, count)` pieces of a transfer of `n` pages, each count a bucket."""
        out, at = [], 0
        for b in reversed(self.buckets):
            while n - at >= b:
                out.append((at, b))
                at += b
        return out

    @functools.cached_property
    def _gather(self):
        kv = self.runner.kv_sharding
        return jax.jit(lambda k, v, pages: (k[:, pages], v[:, pages]), out_shardings=(kv, kv))

    @functools.cached_property
    def _scatter(self):
        kv = self.runner.kv_sharding

        def scatter(k_cache, v_cache, bounds, pages, k, v):
            if bounds is not None:  # sparse attention: the loaded pages' key bounds
                bounds = (bounds[0].at[:, pages].set(k.min(axis=2).astype(bounds[0].dtype)),
                          bounds[1].at[:, pages].set(k.max(axis=2).astype(bounds[1].dtype)))
            return k_cache.at[:, pages].set(k), v_cache.at[:, pages].set(v), bounds

        bounds = None if self.runner.bounds is None else self.runner.bounds_sharding
        return jax.jit(scatter, donate_argnums=(0, 1, 2), out_shardings=(kv, kv, bounds))

    def gather(self, pages: np.ndarray) -> list[tuple[int, jax.Array, jax.Array]]:
        """Dispatch gathers of `pages`; `[(count, k, v)]` per piece, each `k` / `v` a device
        array `[layers, count, page_size, kv_heads, head_dim]`. Returns at once."""
        r = self.runner
        return [(n, *self._gather(r.k_cache, r.v_cache, pages[at : at + n])) for at, n in self.pieces(len(pages))]

    def scatter(self, pages: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Write `k`, `v` `[layers, len(pages), page_size, kv_heads, head_dim]` into `pages`
        of the pool, one piece per call (`len(pages)` a bucket: see `pieces`). Returns
        once dispatched."""
        r = self.runner
        k_dev, v_dev = jax.device_put((k, v), r.kv_sharding)
        r.k_cache, r.v_cache, r.bounds = self._scatter(r.k_cache, r.v_cache, r.bounds, pages, k_dev, v_dev)

    def warmup(self) -> None:
        """Compile the gather and scatter of every bucket (page 0 only: nothing changes)."""
        for b in self.buckets:
            pages = np.zeros(b, np.int32)
            (_, k, v), = self.gather(pages)
            self.scatter(pages, np.asarray(k), np.asarray(v))  # page 0 gets page 0: nothing changes
        jax.block_until_ready(self.runner.k_cache)
