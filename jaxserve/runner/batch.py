"""StepBatch: what the host uploads for one step, and its expansion on the device.

The host sends only what changes per step: the new tokens (a negative id `-r` stands for
the token row `r` sampled last, still on the device), the per-sequence query and KV
lengths, each sequence's row and whether it samples, and the page-table entries added
since the last step. All of it lives in one int32 buffer (the fields are views into it),
so a step is one host-to-device copy. The jitted programs slice the buffer by its static
layout and expand it into the model's `ForwardBatch`: positions, KV write locations and
the batch's page table come from the row-indexed page table on the device, so the upload
does not grow with the length of the sequences.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models import ForwardBatch
from pallas_kernels.common import token_layout


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static shape of a step: tokens T, sequences S, page-table updates U."""

    num_tokens: int
    max_seqs: int
    num_updates: int
    decode_only: bool  # one token per sequence and T == S: the split-K decode path

    def fields(self) -> list[tuple[str, int]]:
        t, s, u = self.num_tokens, self.max_seqs, self.num_updates
        return [("input_ids", t), ("cu_q_lens", s + 1), ("kv_lens", s), ("rows", s), ("emit", s), ("num_seqs", 1),
                ("page_rows", u), ("page_cols", u), ("page_vals", u)]

    @property
    def for_sampling(self) -> "Layout":
        """The layout as the sample program sees it: the attention path does not matter
        there, so one compiled sample program serves both paths of a bucket."""
        return dataclasses.replace(self, decode_only=False)

    @property
    def size(self) -> int:
        return sum(n for _, n in self.fields())

    def unpack(self, buf) -> dict:
        """Field name -> slice of `buf` (numpy views on the host, slices in a jitted program)."""
        out, at = {}, 0
        for name, n in self.fields():
            out[name] = buf[at : at + n]
            at += n
        return out


class StepBatch:
    """Host side of one step: `buf` [layout.size] int32 and named views into it.

    input_ids [T] (-r = the last token of row r); cu_q_lens [S + 1] (padded sequences are
    empty); kv_lens [S] including this step's tokens; rows [S] device row per sequence (0 =
    padding); emit [S] 1 where the sequence samples; num_seqs [1]; page_rows, page_cols,
    page_vals [U]: page-table updates table[page_rows, page_cols] = page_vals.
    """

    def __init__(self, layout: Layout):
        self.layout = layout
        self.buf = np.zeros(layout.size, np.int32)  # [size]
        for name, view in layout.unpack(self.buf).items():
            setattr(self, name, view)


def max_page_updates(num_tokens: int, max_seqs: int, page_size: int) -> int:
    """Page-table entries one step can add: a chunk of c tokens needs at most c // page_size + 1."""
    return num_tokens // page_size + max_seqs + 1


def expand(layout: Layout, buf: jax.Array, page_table: jax.Array, last_token: jax.Array, page_size: int):
    """(ForwardBatch, updated page table) on the device (jittable)."""
    f = layout.unpack(buf)
    page_table = page_table.at[f["page_rows"], f["page_cols"]].set(f["page_vals"])
    input_ids = jnp.where(f["input_ids"] < 0, last_token[-f["input_ids"]], f["input_ids"])
    seq_ids, positions, valid = token_layout(f["cu_q_lens"], f["kv_lens"], f["num_seqs"], layout.num_tokens)
    table = page_table[f["rows"]]  # [S, pages_per_seq]
    positions = jnp.where(valid, positions, 0)
    page = table[seq_ids, positions // page_size]
    slot_mapping = jnp.where(valid, page * page_size + positions % page_size, 0)  # padding -> dummy page 0
    forward = ForwardBatch(input_ids, positions, slot_mapping, f["cu_q_lens"], f["kv_lens"], table, f["num_seqs"],
                           layout.decode_only)
    return forward, page_table


def rows_and_emit(layout: Layout, buf: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each sequence's device row [S] and whether it samples [S] (jittable)."""
    f = layout.unpack(buf)
    return f["rows"], f["emit"] > 0
