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
bounded (query blocks x KV block) and the work is proportional to tokens x context. It is
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
    q_block_schedule,
    token_layout,
)


def default_block_q(num_tokens: int, max_seqs: int) -> int:
    """Query rows per block: about the tokens of an average sequence, a power of two <= 64."""
    per_seq = max(1, num_tokens // max(max_seqs, 1))
    return min(64, 1 << (per_seq.bit_length() - 1))


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
    block_tokens: int = 64,  # small KV blocks: the gathered traffic tracks the real context
    block_q: int | None = None,
):
    """Attention of a ragged batch of queries over the paged KV cache. Returns [T, Hq, D].

    Queries are cut into blocks of `block_q` tokens that never span two sequences, so a
    block gathers its sequence's pages once for all its rows: gathered KV traffic is
    (blocks x context), not (tokens x context), which is what makes long prefills
    affordable on CPU.
    """
    q, k_pages, v_pages = jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages)
    kv_lens, page_table, cu_q_lens = jnp.asarray(kv_lens), jnp.asarray(page_table), jnp.asarray(cu_q_lens)
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    max_seqs, pages_per_seq = page_table.shape
    group = num_q_heads // num_kv_heads
    pages_per_block = max(1, min(pages_per_seq, block_tokens // page_size))
    num_kv_blocks = -(-pages_per_seq // pages_per_block)
    page_table = jnp.pad(page_table, ((0, 0), (0, num_kv_blocks * pages_per_block - pages_per_seq)))
    block_len = pages_per_block * page_size

    block_q = block_q or default_block_q(num_tokens, max_seqs)
    num_q_blocks = min(-(-num_tokens // block_q) + max_seqs, num_tokens)  # static bound, each block >= 1 token
    seq, start, end = q_block_schedule(cu_q_lens, num_seqs, block_q, num_q_blocks)  # [W]
    rows = start[:, None] + jnp.arange(block_q, dtype=jnp.int32)  # [W, block_q] token index
    row_ok = rows < end[:, None]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    kv_len = jnp.where(end > start, kv_lens[seq], 0)  # [W]
    q_pos = (kv_len - q_len)[:, None] + rows - cu_q_lens[seq][:, None]  # [W, block_q]
    # [W, Hkv, group * block_q, D]: a KV head's query heads and rows form one matrix.
    qb = q[jnp.minimum(rows, num_tokens - 1)].astype(jnp.float32)  # [W, block_q, Hq, D]
    qb = qb.reshape(num_q_blocks, block_q, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    qb = qb.reshape(num_q_blocks, num_kv_heads, group * block_q, head_dim)
    row_pos = jnp.tile(q_pos, (1, group))  # [W, group * block_q], matching qb's row order

    def body(b, carry):
        pages = jax.lax.dynamic_slice_in_dim(page_table, b * pages_per_block, pages_per_block, 1)[seq]
        # [W, Hkv, block_len, D]
        k = k_pages[pages].reshape(num_q_blocks, block_len, num_kv_heads, head_dim).transpose(0, 2, 1, 3)
        v = v_pages[pages].reshape(num_q_blocks, block_len, num_kv_heads, head_dim).transpose(0, 2, 1, 3)
        scores = attention_scores(qb, k.astype(jnp.float32), sm_scale, soft_cap)  # [W, Hkv, rows, K]
        k_pos = b * block_len + jnp.arange(block_len, dtype=jnp.int32)
        mask = attention_mask(row_pos[:, :, None], k_pos, kv_len[:, None, None], sliding_window)
        return online_softmax_update(*carry, scores, mask[:, None], v.astype(jnp.float32))

    init = init_softmax_state((num_q_blocks, num_kv_heads, group * block_q), head_dim)
    # Only walk as many KV blocks as the longest sequence in the batch needs.
    _, l, acc = jax.lax.fori_loop(0, -(-jnp.max(kv_len) // block_len), body, init)
    out = finalize(l, acc).reshape(num_q_blocks, num_kv_heads, group, block_q, head_dim)
    out = out.transpose(0, 3, 1, 2, 4).reshape(num_q_blocks * block_q, num_q_heads, head_dim)
    target = jnp.where(row_ok, rows, num_tokens).reshape(-1)  # rows past a block's end are dropped
    result = jnp.zeros((num_tokens, num_q_heads, head_dim), jnp.float32).at[target].set(out, mode="drop")
    return result.astype(q.dtype)
