"""Reading paged KV inside a Triton (GPU) Pallas kernel.

The Triton lowering has no scalar prefetch, so kernels receive the whole page table
and KV pool as plain refs and turn key positions into addresses themselves: one
gather of page ids from the page table, then one masked gather of the key rows.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu


def load_kv_block(k_ref, v_ref, page_table_ref, seq, head, k_pos, valid):
    """Gather the keys/values of one sequence and KV head at positions k_pos.

    k_ref, v_ref: [P, S, Hkv, D]; page_table_ref: [max_seqs, pages_per_seq];
    k_pos, valid: [K]. Returns k, v: [K, D]; rows where valid is False read as zero
    (never touching memory, so stale page-table entries are harmless).
    """
    page_size, head_dim = k_ref.shape[1], k_ref.shape[3]
    pages = plgpu.load(page_table_ref.at[seq, k_pos // page_size], mask=valid, other=0)  # [K]
    d = jnp.arange(head_dim, dtype=jnp.int32)
    index = (pages[:, None], (k_pos % page_size)[:, None], head, d[None, :])
    row_mask = jnp.broadcast_to(valid[:, None], (k_pos.shape[0], head_dim))
    k = plgpu.load(k_ref.at[index], mask=row_mask, other=0)
    v = plgpu.load(v_ref.at[index], mask=row_mask, other=0)
    return k, v


def unsupported_reason(q, k_pages):
    """Why the Triton kernels cannot run this shape (None when they can)."""
    head_dim, page_size = q.shape[-1], k_pages.shape[1]
    if head_dim & (head_dim - 1) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two >= 16"
    if page_size & (page_size - 1):
        return f"page_size {page_size} is not a power of two"
    if jnp.dtype(q.dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} is not float32/bfloat16/float16"
    return None
