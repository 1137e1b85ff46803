"""Paged KV streaming for the TPU (Mosaic) kernels: manual, double-buffered page DMA.

The page table and kv lengths are scalar-prefetched into SMEM; the KV pool stays in
HBM (memory_space=ANY) and one KV head of `pages_per_block` pages is copied into a
VMEM slot per step, while the next block is already in flight into the other slot.
Each page is one strided DMA (`[S, D]` rows of head h), so VMEM holds exactly the
[block_kv, D] tile the matmuls want, whatever the number of KV heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def kv_scratch_shapes(block_kv, head_dim, dtype):
    """VMEM scratch for `stream_kv_blocks`: k/v double buffers and their semaphores."""
    return [
        pltpu.VMEM((2, block_kv, head_dim), dtype),  # k slots
        pltpu.VMEM((2, block_kv, head_dim), dtype),  # v slots
        pltpu.SemaphoreType.DMA((2, 2)),  # [k/v, slot]
    ]


def stream_kv_blocks(
    k_hbm, v_hbm,  # [P, S, Hkv, D] in HBM
    k_buf, v_buf,  # [2, block_kv, D] VMEM
    sems,  # DMA semaphores [2, 2]
    page_table_ref,  # [max_seqs * pages_per_seq] SMEM (flattened)
    *, pages_per_seq, seq, head, kv_len, first, last, compute, init,
):
    """carry = compute(blk, k [block_kv, D], v [block_kv, D], carry) for blk in [first, last).

    Keys past kv_len in the last block come from a clamped (real) page and must be
    masked by `compute`; values there are zeroed here so stale data cannot leak NaNs
    into the PV matmul.
    """
    page_size = k_hbm.shape[1]
    block_kv = k_buf.shape[1]
    pages_per_block = block_kv // page_size
    last_page = jnp.clip(jax.lax.div(kv_len + page_size - 1, page_size) - 1, 0, pages_per_seq - 1)

    def copies(blk, slot):
        out = []
        for i in range(pages_per_block):
            page = page_table_ref[seq * pages_per_seq + jnp.minimum(blk * pages_per_block + i, last_page)]
            rows = pl.ds(i * page_size, page_size)
            out.append(pltpu.make_async_copy(k_hbm.at[page, :, head, :], k_buf.at[slot, rows, :], sems.at[0, slot]))
            out.append(pltpu.make_async_copy(v_hbm.at[page, :, head, :], v_buf.at[slot, rows, :], sems.at[1, slot]))
        return out

    @pl.when(first < last)
    def _():
        for c in copies(first, 0):
            c.start()

    def body(blk, carry):
        slot = jax.lax.rem(blk - first, 2)

        @pl.when(blk + 1 < last)
        def _():
            for c in copies(blk + 1, 1 - slot):
                c.start()

        for c in copies(blk, slot):
            c.wait()
        k, v = k_buf[slot], v_buf[slot]
        key_ok = blk * block_kv + jax.lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0) < kv_len
        v = jnp.where(key_ok, v, jnp.zeros_like(v))
        return compute(blk, k, v, carry)

    return jax.lax.fori_loop(first, last, body, init)



def unsupported_reason(q, k_pages):
    """Why the TPU kernels cannot run this shape (None when they can).

    Mosaic tiles the second-minor dim in 32-bit sublanes: 8 rows of f32, 16 of bf16.
    A page must fill whole tiles so that each page DMA lands tile-aligned in the
    [block_kv, D] VMEM buffer; we have not been able to check sub-tile page DMAs on
    hardware, so those shapes go to the reference.
    """
    page_size, head_dim = k_pages.shape[1], k_pages.shape[3]
    itemsize = jnp.dtype(k_pages.dtype).itemsize
    if jnp.dtype(q.dtype) not in (jnp.float32, jnp.bfloat16):
        return f"dtype {q.dtype} is not float32/bfloat16"
    if (page_size * itemsize) % 32:
        return f"page_size {page_size} does not fill whole {32 // itemsize}-row {k_pages.dtype} tiles"
    if head_dim % 64:
        return f"head_dim {head_dim} is not a multiple of 64"
    return None
