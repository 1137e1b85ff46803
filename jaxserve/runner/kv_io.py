"""KV pages between the device pool and the host: the device half of a transfer.

A transfer never copies the whole pool. `gather(pages)` is a jitted gather of some pages
of the pool into a fresh device array; `scatter(pages, k, v)` a jitted scatter into the
donated pool. Both are dispatched on the scheduler thread between step programs, so the
device runs them in order with the steps: a gather sees the KV of every step launched
before it, and a page freed after its gather may be reused by the next step at once.
The host half (copying a gathered array to host memory, reading host pages) is the
caller's (`memory/hicache.py`), on a worker thread for writes.

Page counts are padded to power-of-two buckets with the dummy page 0 (a gather of it is
thrown away, a scatter into it lands where padded tokens write anyway), so a transfer
never compiles after warm-up.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

MAX_TRANSFER_PAGES = 64  # the largest bucket; longer transfers are cut into pieces


def transfer_buckets(max_pages: int = MAX_TRANSFER_PAGES) -> list[int]:
    buckets, b = [], 1
    while b < max_pages:
        buckets.append(b)
        b *= 2
    return buckets + [max_pages]


class PageIO:
    """Gather / scatter of whole pages of `runner`'s KV pool (see the module doc)."""

    def __init__(self, runner, max_pages: int = MAX_TRANSFER_PAGES):
        self.runner = runner
        self.buckets = transfer_buckets(max_pages)
        self.max_pages = max_pages

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _padded(self, pages: np.ndarray) -> np.ndarray:
        out = np.zeros(self._bucket(len(pages)), np.int32)
        out[: len(pages)] = pages
        return out

    @functools.cached_property
    def _gather(self):
        kv = self.runner.kv_sharding
        return jax.jit(lambda k, v, pages: (k[:, pages], v[:, pages]), out_shardings=(kv, kv))

    @functools.cached_property
    def _scatter(self):
        kv = self.runner.kv_sharding

        def scatter(k_cache, v_cache, pages, k, v):
            return k_cache.at[:, pages].set(k), v_cache.at[:, pages].set(v)

        return jax.jit(scatter, donate_argnums=(0, 1), out_shardings=(kv, kv))

    def gather(self, pages: np.ndarray) -> list[tuple[int, jax.Array, jax.Array]]:
        """Dispatch gathers of `pages`; `[(count, k, v)]` per piece, each `k` / `v` a device
        array `[layers, bucket, page_size, kv_heads, head_dim]` whose first `count` pages
        are the asked ones. Returns at once."""
        r = self.runner
        out = []
        for at in range(0, len(pages), self.max_pages):
            piece = pages[at : at + self.max_pages]
            k, v = self._gather(r.k_cache, r.v_cache, self._padded(piece))
            out.append((len(piece), k, v))
        return out

    def scatter(self, pages: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Write host arrays `k`, `v` `[layers, len(pages), page_size, kv_heads, head_dim]`
        into `pages` of the pool. Returns once dispatched."""
        r = self.runner
        for at in range(0, len(pages), self.max_pages):
            piece = pages[at : at + self.max_pages]
            padded = self._padded(piece)
            shape = (k.shape[0], len(padded), *k.shape[2:])
            k_in, v_in = np.zeros(shape, k.dtype), np.zeros(shape, v.dtype)
            k_in[:, : len(piece)] = k[:, at : at + len(piece)]
            v_in[:, : len(piece)] = v[:, at : at + len(piece)]
            k_dev, v_dev = (jax.device_put(x, r.kv_sharding) for x in (k_in, v_in))
            r.k_cache, r.v_cache = self._scatter(r.k_cache, r.v_cache, padded, k_dev, v_dev)

    def warmup(self) -> None:
        """Compile the gather and scatter of every bucket (page 0 only: nothing changes)."""
        for b in self.buckets:
            pages = np.zeros(b, np.int32)
            (_, k, v), = self.gather(pages)
            self.scatter(pages, np.asarray(k), np.asarray(v))
        jax.block_until_ready(self.runner.k_cache)
