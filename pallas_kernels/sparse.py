"""Query-aware page selection for decode (Quest): per-page key bounds and top pages.

Every KV page keeps, per KV head, the element-wise min and max of its keys (`bounds`,
`[num_pages, Hkv, D]` each). For a query q, `sum_d max(q_d * min_d, q_d * max_d)` is an
upper bound of q.k over the page's keys. A page's score is, over the query heads, the
largest bound relative to that head's best page, times `sm_scale`: the log of an upper
bound on the page's attention weight against the head's top page, so heads of different
scales compare. The first `sink_pages` and last `recent_pages` pages of a sequence are
always kept; of the rest, the best scores fill `budget_pages`, and with `threshold`, pages
whose bound on their share (`exp(score)`) is below it are dropped within that budget.

`select_pages` returns a compacted page table (the kept pages in order, the sequence's
last, partial page last, the table's width unchanged) and the matching KV lengths, which
the existing `paged_decode` kernels read like any page table: they then touch only the
kept pages. A sequence with at most `budget_pages` pages keeps all of them, so its result
is the dense one.

`update_bounds` keeps the bounds exact in the step that writes the keys: a write to row 0
of a page starts the page afresh (pages fill from row 0, so a reused page forgets its old
keys), the other rows take min / max with what is there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def new_bounds(num_pages: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32):
    """Empty bounds (min = +inf, max = -inf), each `[num_pages, Hkv, D]`."""
    shape = (num_pages, num_kv_heads, head_dim)
    return jnp.full(shape, jnp.inf, dtype), jnp.full(shape, -jnp.inf, dtype)


def update_bounds(kmin, kmax, k, page, row):
    """Fold keys `k [T, Hkv, D]` written at (`page [T]`, `row [T]`) into the bounds."""
    k = k.astype(kmin.dtype)
    fresh = jnp.where(row == 0, page, kmin.shape[0])  # out of range: dropped by the scatter
    kmin = kmin.at[fresh].set(jnp.inf, mode="drop").at[page].min(k)
    kmax = kmax.at[fresh].set(-jnp.inf, mode="drop").at[page].max(k)
    return kmin, kmax


def page_scores(q, kmin, kmax, page_table, kv_lens, *, page_size: int, sm_scale: float):
    """Scores `[B, W]` of every page-table slot (-inf past the sequence's pages)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = kmin.shape[1]
    qg = q.astype(jnp.float32).reshape(batch, 1, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    lo = kmin[page_table].astype(jnp.float32)[:, :, :, None, :]  # [B, W, Hkv, 1, D]
    hi = kmax[page_table].astype(jnp.float32)[:, :, :, None, :]
    bound = jnp.maximum(qg * lo, qg * hi).sum(-1).reshape(batch, page_table.shape[1], num_q_heads)
    valid = jnp.arange(page_table.shape[1])[None, :] < -(-kv_lens[:, None] // page_size)  # [B, W]
    bound = jnp.where(valid[:, :, None], bound, -jnp.inf)
    best = bound.max(axis=1, keepdims=True)
    relative = jnp.where(valid[:, :, None], (bound - best) * sm_scale, -jnp.inf)
    return relative.max(axis=-1)


def select_pages(q, kmin, kmax, page_table, kv_lens, *, page_size: int, sm_scale: float, budget_pages,
                 sink_pages: int = 1, recent_pages: int = 1, threshold: float | None = None):
    """(compacted page table `[B, W]`, its KV lengths `[B]`, kept pages `[B]`).

    `budget_pages` is an int or one per sequence `[B]`; the table keeps its width, the
    kept pages first, so kernels, which read no page past a sequence's length, read only them."""
    width = page_table.shape[1]
    num_pages = -(-kv_lens // page_size)  # [B]
    scores = page_scores(q, kmin, kmax, page_table, kv_lens, page_size=page_size, sm_scale=sm_scale)
    slot = jnp.arange(width)[None, :]
    forced = (slot < sink_pages) | (slot >= num_pages[:, None] - recent_pages)
    valid = slot < num_pages[:, None]
    keep_score = jnp.where(forced & valid, jnp.inf, scores)
    if threshold is not None:
        keep_score = jnp.where(forced | (scores >= jnp.log(threshold)), keep_score, -jnp.inf)
    top, idx = jax.lax.top_k(keep_score, width)  # every slot, best first
    budget = jnp.broadcast_to(jnp.asarray(budget_pages), kv_lens.shape)[:, None]
    kept_slot = (top > -jnp.inf) & (slot < budget)
    idx = jnp.sort(jnp.where(kept_slot, idx, width), axis=1)  # kept slots in order, the rest last
    kept = kept_slot.sum(axis=1)
    table = jnp.where(idx < width, jnp.take_along_axis(page_table, jnp.minimum(idx, width - 1), axis=1), 0)
    last_len = kv_lens - (num_pages - 1) * page_size
    lens = jnp.where(kv_lens > 0, (kept - 1) * page_size + last_len, 0)
    return table.astype(page_table.dtype), lens.astype(kv_lens.dtype), kept


@dataclasses.dataclass(frozen=True)
class SparseAttention:
    """`--sparse-attention quest` settings: decode reads at most `token_budget` KV tokens of
    a sequence whose context is at least `min_context` tokens (shorter ones stay dense)."""

    token_budget: int
    min_context: int
    sink_pages: int = 1
    recent_pages: int = 1
    threshold: float | None = None

    def select(self, q, kmin, kmax, page_table, kv_lens, page_size: int, sm_scale: float):
        """(page table, KV lengths) that decode attention reads; a step whose sequences are
        all shorter than the budget or `min_context` skips the selection."""
        budget_pages = max(1, self.token_budget // page_size)
        sparse = kv_lens >= max(self.min_context, budget_pages * page_size + 1)

        def select():
            budget = jnp.where(sparse, budget_pages, page_table.shape[1])
            table, lens, _ = select_pages(q, kmin, kmax, page_table, kv_lens, page_size=page_size,
                                          sm_scale=sm_scale, budget_pages=budget, sink_pages=self.sink_pages,
                                          recent_pages=self.recent_pages, threshold=self.threshold)
            return table, lens

        return jax.lax.cond(jnp.any(sparse), select, lambda: (page_table, kv_lens))
