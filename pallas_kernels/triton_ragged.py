"""GPU (Triton) ragged paged attention: prefill, extend and decode in one call.

The tokens are cut into sequence-aligned query blocks (`common.q_block_schedule`),
so a program sees exactly one sequence; grid (query block, kv_head). A program packs
block_q tokens x the G query heads of its KV head into the rows of one tile (row r =
token r // Gp, head r % Gp, Gp = G rounded up to a power of two), reads the page
table inside the kernel and walks only the key blocks its causal/sliding window can
see. Rows of padding tokens are never written; the output starts as zeros (aliased
input), so padded tokens come out zero.
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
    finalize,
    init_softmax_state,
    kv_range,
    next_power_of_2,
    online_softmax_update,
    q_block_schedule,
)
from pallas_kernels.triton_pages import load_kv_block


def _ragged_kernel(
    blk_seq_ref, blk_start_ref, blk_end_ref,  # [W] the schedule
    kv_lens_ref,  # [max_seqs]
    page_table_ref,  # [max_seqs, pages_per_seq]
    cu_q_lens_ref,  # [max_seqs + 1]
    q_ref,  # [T, Hq, D]
    k_ref, v_ref,  # [P, S, Hkv, D]
    zeros_ref,  # [T, Hq, D], aliased to o_ref
    o_ref,  # [T, Hq, D]
    *, sm_scale, soft_cap, sliding_window, group, group_pad, block_q, block_kv,
):
    del zeros_ref
    w, h = pl.program_id(0), pl.program_id(1)
    rows = block_q * group_pad
    head_dim = q_ref.shape[2]
    seq, t_start, t_end = blk_seq_ref[w], blk_start_ref[w], blk_end_ref[w]
    kv_len = kv_lens_ref[seq]
    q_start = cu_q_lens_ref[seq]
    q_len = cu_q_lens_ref[seq + 1] - q_start

    r = jnp.arange(rows, dtype=jnp.int32)
    tok = t_start + r // group_pad  # [rows]
    g = r % group_pad
    row_ok = (tok < t_end) & (g < group)
    q_pos = kv_len - q_len + (tok - q_start)  # [rows]
    d = jnp.arange(head_dim, dtype=jnp.int32)
    # Out-of-range rows are masked; their indices are never dereferenced on GPU.
    q_index = (tok[:, None], (h * group + g)[:, None], d[None, :])
    row_mask = jnp.broadcast_to(row_ok[:, None], (rows, head_dim))
    q = plgpu.load(q_ref.at[q_index], mask=row_mask, other=0).astype(k_ref.dtype)

    first_pos = kv_len - q_len + (t_start - q_start)
    last_pos = kv_len - q_len + (t_end - 1 - q_start)
    lo, hi = kv_range(first_pos, last_pos, kv_len, sliding_window)
    hi = jnp.where(t_end > t_start, hi, 0)  # empty schedule slot: no key blocks

    def body(blk, carry):
        k_pos = blk * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # [K]
        k, v = load_kv_block(k_ref, v_ref, page_table_ref, seq, h, k_pos, (k_pos >= lo) & (k_pos < hi))
        scores = attention_scores(q, k, sm_scale, soft_cap)  # [rows, K]
        mask = attention_mask(q_pos[:, None], k_pos[None, :], kv_len, sliding_window) & row_ok[:, None]
        return online_softmax_update(*carry, scores, mask, v)

    first, last = block_range(lo, hi, block_kv)
    _, l, acc = jax.lax.fori_loop(first, last, body, init_softmax_state((rows,), head_dim))
    plgpu.store(o_ref.at[q_index], finalize(l, acc).astype(o_ref.dtype), mask=row_mask)


def ragged_paged_attention(
    q,  # [T, Hq, D]
    k_pages, v_pages,  # [P, S, Hkv, D]
    kv_lens,  # [max_seqs] int32
    page_table,  # [max_seqs, pages_per_seq] int32
    cu_q_lens,  # [max_seqs + 1] int32
    num_seqs,  # [1] int32
    *, sm_scale, soft_cap=None, sliding_window=None, block_q=None, block_kv=64,
    num_warps=4, num_stages=2, interpret=False,
):
    """Ragged paged attention on the Triton backend. Returns [T, Hq, D]."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    if block_q is None:
        # ~64 rows per tile, and at least 16 for the tensor-core dot.
        block_q = max(1, 64 // group_pad)
    block_q = max(block_q, 16 // min(group_pad, 16))
    block_kv = max(block_kv, page_size)
    num_blocks = -(-num_tokens // block_q) + page_table.shape[0]
    blk_seq, blk_start, blk_end = q_block_schedule(cu_q_lens, num_seqs, block_q, num_blocks)

    kernel = functools.partial(
        _ragged_kernel, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        group=group, group_pad=group_pad, block_q=block_q, block_kv=block_kv)
    return pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads),
        in_specs=[pl.no_block_spec] * 10,
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        input_output_aliases={9: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxserve_ragged_paged_attention_triton",
    )(blk_seq, blk_start, blk_end, kv_lens, page_table, cu_q_lens, q, k_pages, v_pages,
      jnp.zeros_like(q))
