"""StepBatch: what the host uploads for one step, and its expansion on the device.

The host sends only what changes per step: the new tokens (a negative id `-r` stands for
the token row `r` sampled last, still on the device), the per-sequence query and KV
lengths, each sequence's row, and the page-table entries added since the last step. The
jitted step expands that into the model's `ForwardBatch`: positions, KV write locations
and the batch's page table are computed on the device from the row-indexed page table,
so the upload does not grow with the length of the sequences.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models import ForwardBatch
from pallas_kernels.common import token_layout


@dataclasses.dataclass
class StepBatch:
    input_ids: np.ndarray  # [T] int32; -r = the last token of row r
    cu_q_lens: np.ndarray  # [S + 1] int32; padded sequences are empty
    kv_lens: np.ndarray  # [S] int32, including this step's tokens
    rows: np.ndarray  # [S] int32 device row of each sequence (0 = padding)
    num_seqs: np.ndarray  # [1] int32
    page_rows: np.ndarray  # [U] int32 page-table updates: table[page_rows, page_cols] = page_vals
    page_cols: np.ndarray  # [U] int32
    page_vals: np.ndarray  # [U] int32
    decode_only: bool = False  # static: one token per sequence and T == S

    @staticmethod
    def empty(num_tokens: int, max_seqs: int, max_updates: int) -> "StepBatch":
        """An all-padding batch of one bucket's shape (row 0, page 0 everywhere)."""
        z = lambda n: np.zeros(n, np.int32)  # noqa: E731
        return StepBatch(z(num_tokens), z(max_seqs + 1), z(max_seqs), z(max_seqs), z(1), z(max_updates),
                         z(max_updates), z(max_updates), decode_only=num_tokens == max_seqs)


jax.tree_util.register_dataclass(
    StepBatch,
    data_fields=["input_ids", "cu_q_lens", "kv_lens", "rows", "num_seqs", "page_rows", "page_cols", "page_vals"],
    meta_fields=["decode_only"],
)


def max_page_updates(num_tokens: int, max_seqs: int, page_size: int) -> int:
    """Page-table entries one step can add: a chunk of c tokens needs at most c // page_size + 1."""
    return num_tokens // page_size + max_seqs + 1


def expand(batch: StepBatch, page_table: jax.Array, last_token: jax.Array, page_size: int):
    """(ForwardBatch, updated page table) on the device (jittable)."""
    page_table = page_table.at[batch.page_rows, batch.page_cols].set(batch.page_vals)
    input_ids = jnp.where(batch.input_ids < 0, last_token[-batch.input_ids], batch.input_ids)
    seq_ids, positions, valid = token_layout(batch.cu_q_lens, batch.kv_lens, batch.num_seqs, len(batch.input_ids))
    table = page_table[batch.rows]  # [S, pages_per_seq]
    positions = jnp.where(valid, positions, 0)
    page = table[seq_ids, positions // page_size]
    slot_mapping = jnp.where(valid, page * page_size + positions % page_size, 0)  # padding -> dummy page 0
    forward = ForwardBatch(input_ids, positions, slot_mapping, batch.cu_q_lens, batch.kv_lens, table,
                           batch.num_seqs, batch.decode_only)
    return forward, page_table
