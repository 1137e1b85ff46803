"""TPU (Mosaic) decode kernel: one query token per sequence, split-K over the pages.

Grid (batch, kv_head, split), all independent ("parallel", so both TensorCores of a
megacore chip share the work). The G query heads of a KV head are the rows of one
[G, D] tile; the program streams its split's pages of that head through VMEM
(`tpu_pages.stream_kv_blocks`, page table and lengths scalar-prefetched into SMEM)
and writes the unnormalised partial state, merged in jnp by `common.combine_splits`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import (
    attention_mask,
    attention_scores,
    block_range,
    init_softmax_state,
    kv_range,
    merge_split_states,
    online_softmax_update,
    split_pages,
    split_state_shapes,
)
from pallas_kernels.tpu_pages import kv_scratch_shapes, stream_kv_blocks


def _decode_kernel(
    kv_lens_ref,  # [B] SMEM
    page_table_ref,  # [B * pages_per_seq] SMEM
    q_ref,  # [G, D] of [B, Hkv, G, D]
    k_hbm, v_hbm,  # [P, S, Hkv, D] HBM
    m_ref, l_ref,  # [G, 1] of [B, Hkv, splits, G, 1]
    acc_ref,  # [G, D] of [B, Hkv, splits, G, D]
    k_buf, v_buf, sems,
    *, sm_scale, soft_cap, sliding_window, pages_per_seq, split_len,
):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    group, head_dim = q_ref.shape
    block_kv = k_buf.shape[1]
    kv_len = kv_lens_ref[b]
    q = q_ref[...].astype(k_buf.dtype)
    q_pos = kv_len - 1
    lo, hi = kv_range(q_pos, q_pos, kv_len, sliding_window)
    start = jnp.maximum(split * split_len, lo)
    end = jnp.minimum((split + 1) * split_len, hi)

    def compute(blk, k, v, carry):
        k_pos = blk * block_kv + jax.lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
        in_split = (k_pos >= start) & (k_pos < end)
        scores = attention_scores(q, k, sm_scale, soft_cap)  # [G, K]
        mask = attention_mask(q_pos, k_pos, kv_len, sliding_window) & in_split  # [1, K]
        return online_softmax_update(*carry, scores, mask, v)

    first, last = block_range(start, end, block_kv)
    m, l, acc = stream_kv_blocks(
        k_hbm, v_hbm, k_buf, v_buf, sems, page_table_ref,
        pages_per_seq=pages_per_seq, seq=b, head=h, kv_len=kv_len, first=first,
        last=last, compute=compute,
        init=init_softmax_state((group,), head_dim))
    m_ref[...] = m
    l_ref[...] = l
    acc_ref[...] = acc


def paged_decode(
    q,  # [B, Hq, D]
    k_pages, v_pages,  # [P, S, Hkv, D]
    kv_lens,  # [B] int32
    page_table,  # [B, pages_per_seq] int32
    *, sm_scale, soft_cap=None, sliding_window=None, num_splits=8, block_kv=128,
    interpret=False,
):
    """Split-K paged decode attention on the TPU backend. Returns [B, Hq, D].

    interpret: False, True (TPU interpret mode on CPU) or a `pltpu.InterpretParams`.
    """
    batch, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    pages_per_seq = page_table.shape[1]
    block_kv = max(block_kv, page_size)
    pages_per_split, num_splits = split_pages(pages_per_seq, block_kv // page_size, num_splits)

    kernel = functools.partial(
        _decode_kernel, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        pages_per_seq=pages_per_seq, split_len=pages_per_split * page_size)
    part = (batch, num_kv_heads, num_splits, group)
    stat_spec = pl.BlockSpec((None, None, None, group, 1), lambda b, h, s, *_: (b, h, s, 0, 0))
    m, l, acc = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, num_kv_heads, num_splits),
            in_specs=[
                pl.BlockSpec((None, None, group, head_dim), lambda b, h, s, *_: (b, h, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=[
                stat_spec, stat_spec,
                pl.BlockSpec((None, None, None, group, head_dim), lambda b, h, s, *_: (b, h, s, 0, 0)),
            ],
            scratch_shapes=kv_scratch_shapes(block_kv, head_dim, k_pages.dtype),
        ),
        out_shape=split_state_shapes(part, head_dim),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        name="jaxserve_paged_decode_tpu",
    )(kv_lens, page_table.reshape(-1), q.reshape(batch, num_kv_heads, group, head_dim), k_pages, v_pages)
    return merge_split_states(m, l, acc, group, q.dtype)
