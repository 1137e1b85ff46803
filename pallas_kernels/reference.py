"""Pure-jnp references for the paged-attention kernels.

KV page layout (one layout for every backend, fixed when the pool is allocated):
    k_pages, v_pages: [num_pages, page_size, num_kv_heads, head_dim]
Page 0 is a reserved dummy page that padded tokens write to; it is never read for a
real sequence. Token j of sequence s lives at page_table[s, j // page_size], row
j % page_size.

Ragged batch: the queries of sequence s are q[cu_q_lens[s]:cu_q_lens[s+1]]; kv_lens[s]
counts the sequence's keys *including* the new tokens (they were written before the
call), so query i of sequence s sits at position kv_lens[s] - q_len + i and attends
causally to keys 0..position. Sequences at index >= num_seqs and tokens at index >=
cu_q_lens[num_seqs] are padding; their outputs are zero.

The reference walks the KV pages in blocks with an online softmax, so memory stays
bounded (tokens x block) and the work is proportional to tokens x context. It is
also the attention backend on CPU. The math lives in `common.py`, shared with the
kernels; the decode reference is in `decode_reference.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Re-exported so that `from pallas_kernels.reference import ...` keeps working.
from pallas_kernels.common import (  # noqa: F401
    DEFAULT_MASK_VALUE,
    apply_soft_cap,
    attention_mask,
    attention_scores,
    finalize,
    init_softmax_state,
    online_softmax_update,
    token_layout,
)


def ragged_paged_attention(
    q,  # [T, Hq, D]
    k_pages,  # [P, S, Hkv, D]
    v_pages,  # [P, S, Hkv, D]
    kv_lens,  # [max_seqs] int32
    page_table,  # [max_seqs, pages_per_seq] int32
    cu_q_lens,  # [max_seqs + 1] int32
    num_seqs,  # [1] or scalar int32
    *,
    sm_scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    block_tokens: int = 256,
):
    """Attention of a ragged batch of queries over the paged KV cache. Returns [T, Hq, D]."""
    q, k_pages, v_pages = jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages)
    kv_lens, page_table, cu_q_lens = jnp.asarray(kv_lens), jnp.asarray(page_table), jnp.asarray(cu_q_lens)
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    pages_per_seq = page_table.shape[1]
    pages_per_block = max(1, min(pages_per_seq, block_tokens // page_size))
    num_blocks = -(-pages_per_seq // pages_per_block)
    pad = num_blocks * pages_per_block - pages_per_seq
    page_table = jnp.pad(page_table, ((0, 0), (0, pad)))

    seq_ids, q_pos, valid = token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens)
    kv_len = jnp.where(valid, kv_lens[seq_ids], 0)  # [T]
    # [T, Hkv, group, D]: the query heads that share a KV head sit together.
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)
    block_len = pages_per_block * page_size

    def body(b, carry):
        pages = jax.lax.dynamic_slice_in_dim(page_table, b * pages_per_block, pages_per_block, 1)
        pages = pages[seq_ids]  # [T, pages_per_block]
        # [T, Hkv, block_len, D]
        k = k_pages[pages].reshape(num_tokens, block_len, num_kv_heads, head_dim).transpose(0, 2, 1, 3)
        v = v_pages[pages].reshape(num_tokens, block_len, num_kv_heads, head_dim).transpose(0, 2, 1, 3)
        scores = attention_scores(qg, k.astype(jnp.float32), sm_scale, soft_cap)  # [T, Hkv, group, K]
        k_pos = b * block_len + jnp.arange(block_len, dtype=jnp.int32)
        mask = attention_mask(q_pos[:, None], k_pos[None, :], kv_len[:, None], sliding_window)
        return online_softmax_update(*carry, scores, mask[:, None, None, :], v.astype(jnp.float32))

    init = init_softmax_state((num_tokens, num_kv_heads, group), head_dim)
    # Only walk as many blocks as the longest sequence in the batch needs.
    used_blocks = -(-jnp.max(kv_len) // block_len)
    _, l, acc = jax.lax.fori_loop(0, used_blocks, body, init)
    out = finalize(l, acc).reshape(num_tokens, num_q_heads, head_dim)
    return jnp.where(valid[:, None, None], out, 0.0).astype(q.dtype)
