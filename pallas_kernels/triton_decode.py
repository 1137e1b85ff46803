"""GPU (Triton) decode kernel: one query token per sequence, split-K over the pages.

Grid (batch, kv_head, split). A program owns the G query heads that share one KV
head (packed as the rows of one tile, padded to a power of two >= 16 so the dots hit
tensor cores), walks the pages of its split in blocks of `block_kv` tokens with the
online softmax, and writes its unnormalised partial state; the splits are merged in
jnp by `common.combine_splits`. Splitting the context is what keeps the GPU busy at
batch 1-8 (flash-decoding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (
    attention_mask,
    attention_scores,
    block_range,
    init_softmax_state,
    kv_range,
    merge_split_states,
    next_power_of_2,
    online_softmax_update,
    split_pages,
    split_state_shapes,
)
from pallas_kernels.triton_pages import load_kv_block


def _decode_kernel(
    kv_lens_ref,  # [B]
    page_table_ref,  # [B, pages_per_seq]
    q_ref,  # [B, Hq, D]
    k_ref, v_ref,  # [P, S, Hkv, D]
    m_ref, l_ref,  # [rows, 1] of [B, Hkv, splits, rows, 1]
    acc_ref,  # [rows, D] of [B, Hkv, splits, rows, D]
    *, sm_scale, soft_cap, sliding_window, group, block_kv, split_len,
):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, head_dim = acc_ref.shape
    kv_len = kv_lens_ref[b]
    g = jnp.arange(rows, dtype=jnp.int32)
    row_ok = g < group
    d = jnp.arange(head_dim, dtype=jnp.int32)
    q = plgpu.load(q_ref.at[b, (h * group + g)[:, None], d[None, :]],
                   mask=jnp.broadcast_to(row_ok[:, None], (rows, head_dim)), other=0)
    q = q.astype(k_ref.dtype)

    q_pos = kv_len - 1
    lo, hi = kv_range(q_pos, q_pos, kv_len, sliding_window)
    start = jnp.maximum(split * split_len, lo)
    end = jnp.minimum((split + 1) * split_len, hi)

    def body(blk, carry):
        k_pos = blk * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # [K]
        in_split = (k_pos >= start) & (k_pos < end)
        k, v = load_kv_block(k_ref, v_ref, page_table_ref, b, h, k_pos, in_split)
        scores = attention_scores(q, k, sm_scale, soft_cap)  # [rows, K]
        mask = (attention_mask(q_pos, k_pos[None, :], kv_len, sliding_window)
                & in_split[None, :] & row_ok[:, None])
        return online_softmax_update(*carry, scores, mask, v)

    first, last = block_range(start, end, block_kv)
    m, l, acc = jax.lax.fori_loop(first, last, body, init_softmax_state((rows,), head_dim))
    m_ref[...] = m
    l_ref[...] = l
    acc_ref[...] = acc


def paged_decode(
    q,  # [B, Hq, D]
    k_pages, v_pages,  # [P, S, Hkv, D]
    kv_lens,  # [B] int32
    page_table,  # [B, pages_per_seq] int32
    *, sm_scale, soft_cap=None, sliding_window=None, num_splits=8, block_kv=64,
    num_warps=4, num_stages=2, interpret=False,
):
    """Split-K paged decode attention on the Triton backend. Returns [B, Hq, D]."""
    batch, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    pages_per_seq = page_table.shape[1]
    block_kv = max(block_kv, page_size)
    pages_per_split, num_splits = split_pages(pages_per_seq, block_kv // page_size, num_splits)
    rows = max(16, next_power_of_2(group))

    kernel = functools.partial(
        _decode_kernel, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        group=group, block_kv=block_kv, split_len=pages_per_split * page_size)
    part = (batch, num_kv_heads, num_splits, rows)
    stat_spec = pl.BlockSpec((None, None, None, rows, 1), lambda b, h, s: (b, h, s, 0, 0))
    m, l, acc = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=[pl.no_block_spec] * 5,
        out_specs=[
            stat_spec, stat_spec,
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
        ],
        out_shape=split_state_shapes(part, head_dim),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxserve_paged_decode_triton",
    )(kv_lens, page_table, q, k_pages, v_pages)
    return merge_split_states(m, l, acc, group, q.dtype)
