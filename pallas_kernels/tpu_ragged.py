"""TPU (Mosaic) ragged paged attention: prefill, extend and decode in one call.

Grid (kv_head, query block). The queries are laid out [Hkv, G, T, D] outside the
kernel so that a block is a dense [G, block_q, D] tile (rows = the G heads sharing a
KV head x block_q consecutive tokens) with no in-kernel gathers. A query block may
hold tokens of several sequences: the program walks those sequences in turn (the
first one is scalar-prefetched), and for each streams only the KV blocks its
causal/sliding window can see; rows of other sequences are masked, and a fully
masked row keeps its softmax state (see `common.online_softmax_update`). Rows of
padding tokens never see a key and finalize to zero.
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
    finalize,
    init_softmax_state,
    kv_range,
    online_softmax_update,
)
from pallas_kernels.tpu_pages import kv_scratch_shapes, stream_kv_blocks


def _ragged_kernel(
    kv_lens_ref,  # [max_seqs] SMEM
    page_table_ref,  # [max_seqs * pages_per_seq] SMEM
    cu_q_lens_ref,  # [max_seqs + 1] SMEM
    num_seqs_ref,  # [1] SMEM
    first_seq_ref,  # [num_q_blocks] SMEM: the sequence holding each block's first token
    q_ref,  # [G, block_q, D] of [Hkv, G, T, D]
    k_hbm, v_hbm,  # [P, S, Hkv, D] HBM
    o_ref,  # [G, block_q, D] of [Hkv, G, T, D]
    k_buf, v_buf, sems,
    *, sm_scale, soft_cap, sliding_window, pages_per_seq,
):
    h, qb = pl.program_id(0), pl.program_id(1)
    group, block_q, head_dim = q_ref.shape
    rows = group * block_q
    block_kv = k_buf.shape[1]
    num_seqs = num_seqs_ref[0]
    tok_lo = qb * block_q
    tok_hi = tok_lo + block_q
    # Row r = g * block_q + t holds token tok_lo + t of query head g (block_q is a power
    # of two, so t = r & (block_q - 1): no vector integer division on the VPU).
    tok = tok_lo + (jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) & (block_q - 1))
    q = q_ref[...].reshape(rows, head_dim).astype(k_buf.dtype)

    def has_seq(carry):
        s = carry[0]
        return (s < num_seqs) & (cu_q_lens_ref[jnp.minimum(s, num_seqs)] < tok_hi)

    def one_seq(carry):
        s, state = carry[0], carry[1:]
        q_start, q_end = cu_q_lens_ref[s], cu_q_lens_ref[s + 1]
        kv_len = kv_lens_ref[s]
        first_tok = kv_len - q_end  # position of token t is first_tok + t
        row_ok = (tok >= q_start) & (tok < q_end)  # [rows, 1]
        q_pos = first_tok + tok  # [rows, 1]
        t0, t1 = jnp.maximum(q_start, tok_lo), jnp.minimum(q_end, tok_hi)
        lo, hi = kv_range(first_tok + t0, first_tok + t1 - 1, kv_len, sliding_window)
        first, last = block_range(lo, jnp.where(t1 > t0, hi, 0), block_kv)

        def compute(blk, k, v, carry):
            k_pos = blk * block_kv + jax.lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
            scores = attention_scores(q, k, sm_scale, soft_cap)  # [rows, K]
            mask = attention_mask(q_pos, k_pos, kv_len, sliding_window) & row_ok
            return online_softmax_update(*carry, scores, mask, v)

        state = stream_kv_blocks(
            k_hbm, v_hbm, k_buf, v_buf, sems, page_table_ref,
            pages_per_seq=pages_per_seq, seq=s, head=h, kv_len=kv_len,
            first=first, last=last, compute=compute, init=state)
        return (s + 1, *state)

    init = (first_seq_ref[qb], *init_softmax_state((rows,), head_dim))
    _, _, l, acc = jax.lax.while_loop(has_seq, one_seq, init)
    o_ref[...] = finalize(l, acc).reshape(group, block_q, head_dim).astype(o_ref.dtype)


def ragged_paged_attention(
    q,  # [T, Hq, D]
    k_pages, v_pages,  # [P, S, Hkv, D]
    kv_lens,  # [max_seqs] int32
    page_table,  # [max_seqs, pages_per_seq] int32
    cu_q_lens,  # [max_seqs + 1] int32
    num_seqs,  # [1] int32
    *, sm_scale, soft_cap=None, sliding_window=None, block_q=32, block_kv=128,
    interpret=False,
):
    """Ragged paged attention on the TPU backend. Returns [T, Hq, D].

    interpret: False, True (TPU interpret mode on CPU) or a `pltpu.InterpretParams`.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    max_seqs, pages_per_seq = page_table.shape
    if block_q & (block_q - 1) or block_q < 8:
        raise ValueError(f"block_q must be a power of two >= 8, got {block_q}")
    block_kv = max(block_kv, page_size)
    num_q_blocks = -(-num_tokens // block_q)
    # [num_q_blocks]: the sequence whose queries include each block's first token.
    first_seq = jnp.searchsorted(cu_q_lens[1:], jnp.arange(num_q_blocks) * block_q, side="right")
    first_seq = jnp.minimum(first_seq, max_seqs).astype(jnp.int32)
    # [Hkv, G, T, D]: one KV head's query rows contiguous per head.
    q_heads = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)

    kernel = functools.partial(
        _ragged_kernel, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        pages_per_seq=pages_per_seq)
    q_spec = pl.BlockSpec((None, group, block_q, head_dim), lambda h, qb, *_: (h, 0, qb, 0))
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(num_kv_heads, num_q_blocks),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec,
            scratch_shapes=kv_scratch_shapes(block_kv, head_dim, k_pages.dtype),
        ),
        out_shape=jax.ShapeDtypeStruct(q_heads.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        name="jaxserve_ragged_paged_attention_tpu",
    )(kv_lens, page_table.reshape(-1), cu_q_lens, jnp.reshape(num_seqs, (1,)).astype(jnp.int32),
      first_seq, q_heads, k_pages, v_pages)
    return out.transpose(2, 0, 1, 3).reshape(num_tokens, num_q_heads, head_dim)
