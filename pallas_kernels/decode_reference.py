"""Pure-jnp reference of the decode-only paged attention (one query per sequence).

It computes exactly what the decode kernels compute: the KV of each sequence is cut
into `num_splits` ranges (split-K, flash-decoding), each range is reduced with the
online softmax of `common.py`, and the partial states are merged by
`common.combine_splits`. So the reference also checks the split arithmetic, and it is
the decode attention on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import (
    attention_mask,
    attention_scores,
    combine_splits,
    init_softmax_state,
    online_softmax_update,
    split_pages,
)


def paged_decode(
    q,  # [B, Hq, D]
    k_pages,  # [P, S, Hkv, D]
    v_pages,  # [P, S, Hkv, D]
    kv_lens,  # [B] int32; the query sits at position kv_len - 1
    page_table,  # [B, pages_per_seq] int32
    *,
    sm_scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    num_splits: int = 1,
    block_tokens: int = 64,  # small KV blocks: the gathered traffic tracks the real context
):
    """Decode attention over paged KV, split-K over the pages. Returns [B, Hq, D]."""
    q, k_pages, v_pages = jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages)
    kv_lens, page_table = jnp.asarray(kv_lens), jnp.asarray(page_table)
    batch, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    pages_per_seq = page_table.shape[1]
    pages_per_block = max(1, min(pages_per_seq, block_tokens // page_size))
    pages_per_split, num_splits = split_pages(pages_per_seq, pages_per_block, num_splits)
    pad = num_splits * pages_per_split - pages_per_seq
    # [B, splits, pages_per_split]
    splits = jnp.pad(page_table, ((0, 0), (0, pad))).reshape(batch, num_splits, pages_per_split)
    block_len = pages_per_block * page_size
    split_len = pages_per_split * page_size

    # [B, splits, Hkv, G, D]: every split sees the same query.
    qg = q.astype(jnp.float32).reshape(batch, 1, num_kv_heads, group, head_dim)
    qg = jnp.broadcast_to(qg, (batch, num_splits, num_kv_heads, group, head_dim))
    q_pos = (kv_lens - 1)[:, None, None]  # [B, 1, 1]

    def body(b, carry):
        pages = jax.lax.dynamic_slice_in_dim(splits, b * pages_per_block, pages_per_block, 2)
        kv_shape = (batch, num_splits, block_len, num_kv_heads, head_dim)
        # [B, splits, Hkv, block_len, D]
        k = k_pages[pages].reshape(kv_shape).transpose(0, 1, 3, 2, 4).astype(jnp.float32)
        v = v_pages[pages].reshape(kv_shape).transpose(0, 1, 3, 2, 4).astype(jnp.float32)
        scores = attention_scores(qg, k, sm_scale, soft_cap)  # [B, splits, Hkv, G, K]
        k_pos = (jnp.arange(num_splits)[:, None] * split_len + b * block_len
                 + jnp.arange(block_len)[None, :])  # [splits, K]
        mask = attention_mask(q_pos, k_pos[None], kv_lens[:, None, None], sliding_window)
        return online_softmax_update(*carry, scores, mask[:, :, None, None, :], v)

    init = init_softmax_state((batch, num_splits, num_kv_heads, group), head_dim)
    blocks_per_split = pages_per_split // pages_per_block
    used_blocks = jnp.minimum(blocks_per_split, -(-jnp.max(kv_lens) // block_len))
    m, l, acc = jax.lax.fori_loop(0, used_blocks, body, init)
    out = combine_splits(m, l, acc, axis=1)  # [B, Hkv, G, D]
    return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype)
