"""The attention math shared by the references and every kernel (plain jnp).

These helpers only use jnp ops that lower inside Pallas kernels on both backends
(Triton and Mosaic), so the references and kernels run the same formulas instead of
copies of them. Statistics keep a trailing singleton axis (`m`, `l`: [..., Q, 1]) so
that the same code works on the batched reference arrays and on 2-D kernel tiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so that max/exp of fully masked rows never produces inf - inf = nan.
DEFAULT_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens):
    """Per-token sequence id, absolute position and validity of a ragged batch.

    Returns (seq_ids [T] int32, positions [T] int32, valid [T] bool).
    """
    num_seqs = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq_ids = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    seq_ids = jnp.minimum(seq_ids, kv_lens.shape[0] - 1)
    valid = (t < cu_q_lens[num_seqs]) & (seq_ids < num_seqs)
    q_lens = cu_q_lens[seq_ids + 1] - cu_q_lens[seq_ids]
    positions = kv_lens[seq_ids] - q_lens + (t - cu_q_lens[seq_ids])
    return seq_ids, positions, valid


def attention_mask(q_pos, k_pos, kv_len, sliding_window=None):
    """Causal (and optional sliding-window) mask; broadcasting over any leading axes."""
    mask = (k_pos <= q_pos) & (k_pos < kv_len)
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def kv_range(first_q_pos, last_q_pos, kv_len, sliding_window=None):
    """Half-open key range [lo, hi) that queries at positions first..last can see."""
    hi = jnp.minimum(last_q_pos + 1, kv_len)
    lo = 0 if sliding_window is None else jnp.maximum(first_q_pos - sliding_window + 1, 0)
    return lo, hi


def block_range(lo, hi, block):
    """Indices [first, last) of the `block`-sized key blocks covering [lo, hi) (lo, hi >= 0).

    Uses truncating lax.div: jnp's floor division lowers through `sign`, which the
    Mosaic lowering cannot lower without a TPU attached (it queries the chip).
    """
    first = jax.lax.div(lo, block)
    return first, jnp.maximum(first, jax.lax.div(hi + block - 1, block))


def apply_soft_cap(scores, soft_cap):
    if soft_cap is None:
        return scores
    return soft_cap * jnp.tanh(scores / soft_cap)


def _precision(dtype):
    # f32 matmuls must not silently drop to tf32/bf16 passes on GPU/TPU: the f32 path
    # is the one we compare against the reference at 1e-5.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def attention_scores(q, k, sm_scale, soft_cap=None):
    """q [..., Q, D] . k [..., K, D] -> scaled (and soft-capped) fp32 scores [..., Q, K]."""
    batch = tuple(range(q.ndim - 2))
    scores = jax.lax.dot_general(
        q, k, (((q.ndim - 1,), (k.ndim - 1,)), (batch, batch)),
        precision=_precision(k.dtype), preferred_element_type=jnp.float32,
    )
    return apply_soft_cap(scores * sm_scale, soft_cap)


def online_softmax_update(m, l, acc, scores, mask, v):
    """Fold one block of keys into the running softmax state (flash attention).

    m, l: [..., Q, 1] running max and normaliser; acc: [..., Q, D] fp32 unnormalised
    output; scores, mask: [..., Q, K]; v: [..., K, D]. The probabilities are cast to
    v's dtype for the PV matmul (bf16 on accelerators, fp32 in the references).
    Masked keys contribute exactly zero, so a block that is entirely masked for a row
    leaves that row's state unchanged; this is what lets a kernel run rows of several
    sequences (or padding) through one tile.
    """
    scores = jnp.where(mask, scores, DEFAULT_MASK_VALUE)
    m_new = jnp.maximum(m, scores.max(axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(scores - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l + p.sum(axis=-1, keepdims=True)
    batch = tuple(range(p.ndim - 2))
    pv = jax.lax.dot_general(
        p.astype(v.dtype), v, (((p.ndim - 1,), (v.ndim - 2,)), (batch, batch)),
        precision=_precision(v.dtype), preferred_element_type=jnp.float32,
    )
    return m_new, l_new, alpha * acc + pv


def init_softmax_state(rows_shape, head_dim):
    """Initial (m, l, acc) for rows_shape query rows: [..., Q, 1], [..., Q, 1], [..., Q, D]."""
    stat = (*rows_shape, 1)
    return (
        jnp.full(stat, DEFAULT_MASK_VALUE, jnp.float32),
        jnp.zeros(stat, jnp.float32),
        jnp.zeros((*rows_shape, head_dim), jnp.float32),
    )


def finalize(l, acc):
    """Normalise the accumulator (l [..., Q, 1], acc [..., Q, D]); rows without keys give 0."""
    return jnp.where(l > 0, acc / jnp.maximum(l, 1e-30), 0.0)


def combine_splits(m, l, acc, axis):
    """Merge split-K partial softmax states along `axis` and normalise (flash-decoding).

    m, l: [..., splits, ..., 1]; acc: [..., splits, ..., D]. A split that saw no key
    has l == 0 and m == DEFAULT_MASK_VALUE, so its weight is 0 (or it adds 0 when all
    splits are empty, and finalize returns zeros).
    """
    m_max = m.max(axis=axis, keepdims=True)
    w = jnp.exp(m - m_max)
    l_sum = (w * l).sum(axis=axis)
    acc_sum = (w * acc).sum(axis=axis)
    return finalize(l_sum, acc_sum)


def split_state_shapes(partition, head_dim):
    """Output shapes of split-K partial states for rows `partition` = (B, Hkv, splits, rows):
    m, l [*partition, 1] and acc [*partition, D], all fp32."""
    return [
        jax.ShapeDtypeStruct((*partition, 1), jnp.float32),
        jax.ShapeDtypeStruct((*partition, 1), jnp.float32),
        jax.ShapeDtypeStruct((*partition, head_dim), jnp.float32),
    ]


def merge_split_states(m, l, acc, group, dtype):
    """Kernel partial states [B, Hkv, splits, rows >= group, .] -> attention output [B, Hkv * group, D]."""
    batch, num_kv_heads, _, _, head_dim = acc.shape
    out = combine_splits(m[:, :, :, :group], l[:, :, :, :group], acc[:, :, :, :group], axis=2)
    return out.reshape(batch, num_kv_heads * group, head_dim).astype(dtype)


def q_block_schedule(cu_q_lens, num_seqs, block_q, num_blocks):
    """Split every sequence's queries into blocks of <= block_q tokens.

    A block never spans two sequences, so a kernel program handles exactly one
    sequence. num_blocks is a static upper bound (cdiv(T, block_q) + max_seqs).
    Returns (seq [W], start [W], end [W]) int32 token ranges; blocks past the real
    count are empty (start == end).
    """
    cu_q_lens = jnp.asarray(cu_q_lens)
    max_seqs = cu_q_lens.shape[0] - 1
    n = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    q_lens = jnp.where(jnp.arange(max_seqs) < n, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    blocks_per_seq = (q_lens + block_q - 1) // block_q
    cu_blocks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(blocks_per_seq)])
    w = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_blocks[1:], w, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, max_seqs - 1)
    start = cu_q_lens[seq] + (w - cu_blocks[seq]) * block_q
    end = jnp.minimum(start + block_q, cu_q_lens[seq + 1])
    end = jnp.where(w < cu_blocks[-1], end, start)
    return seq, start.astype(jnp.int32), end.astype(jnp.int32)


def next_power_of_2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def split_pages(pages_per_seq: int, pages_per_block: int, num_splits: int):
    """Static split-K geometry of a decode: (pages_per_split, num_splits).

    Splits cover whole blocks of pages_per_block pages so a block never straddles two
    splits; the number of splits is lowered when the page table is too short to give
    every split at least one block.
    """
    num_blocks = -(-pages_per_seq // pages_per_block)
    num_splits = max(1, min(num_splits, num_blocks))
    blocks_per_split = -(-num_blocks // num_splits)
    num_splits = -(-num_blocks // blocks_per_split)
    return blocks_per_split * pages_per_block, num_splits
