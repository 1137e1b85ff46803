"""ForwardBatch: the fixed-shape ragged batch one model step consumes."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass
class ForwardBatch:
    """A ragged batch of prefill chunks, extends and decode tokens, padded to a bucket.

    Tokens of sequence s are input_ids[cu_q_lens[s]:cu_q_lens[s+1]]; kv_lens[s] counts its
    keys including these new tokens. Padded tokens write their K/V to the dummy page 0.
    """

    input_ids: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32
    slot_mapping: jax.Array  # [T] int32, page * page_size + offset of each new token
    cu_q_lens: jax.Array  # [max_seqs + 1] int32
    kv_lens: jax.Array  # [max_seqs] int32
    page_table: jax.Array  # [max_seqs, pages_per_seq] int32
    num_seqs: jax.Array  # [1] int32
    # Static: every sequence feeds exactly one token and token i belongs to sequence i
    # (T == max_seqs), so attention can take the split-K decode path.
    decode_only: bool = False

    @staticmethod
    def build(seqs, page_size: int, num_tokens: int | None = None, max_seqs: int | None = None,
              pages_per_seq: int | None = None) -> "ForwardBatch":
        """Build a padded batch on the host from (new_token_ids, start_position, pages) triples.

        `pages` lists the sequence's pages covering positions 0..start+len(new)-1.
        """
        total = sum(len(ids) for ids, _, _ in seqs)
        num_tokens = num_tokens or total
        max_seqs = max_seqs or len(seqs)
        width = pages_per_seq or max(len(p) for _, _, p in seqs)
        input_ids = np.zeros(num_tokens, np.int32)  # [T]
        positions = np.zeros(num_tokens, np.int32)  # [T]
        slot_mapping = np.zeros(num_tokens, np.int32)  # [T] KV location of each new token
        cu_q_lens = np.full(max_seqs + 1, total, np.int32)  # [max_seqs + 1]
        kv_lens = np.zeros(max_seqs, np.int32)  # [max_seqs]
        page_table = np.zeros((max_seqs, width), np.int32)  # [max_seqs, pages_per_seq]
        t = 0
        for s, (ids, start, pages) in enumerate(seqs):
            n = len(ids)
            pos = np.arange(start, start + n)
            pages = np.asarray(pages, np.int32)
            input_ids[t : t + n] = ids
            positions[t : t + n] = pos
            slot_mapping[t : t + n] = pages[pos // page_size] * page_size + pos % page_size
            cu_q_lens[s] = t
            kv_lens[s] = start + n
            page_table[s, : len(pages)] = pages
            t += n
        decode_only = num_tokens == max_seqs and all(len(ids) == 1 for ids, _, _ in seqs)
        return ForwardBatch(input_ids, positions, slot_mapping, cu_q_lens, kv_lens, page_table,
                            np.array([len(seqs)], np.int32), decode_only)


jax.tree_util.register_dataclass(
    ForwardBatch,
    data_fields=["input_ids", "positions", "slot_mapping", "cu_q_lens", "kv_lens", "page_table", "num_seqs"],
    meta_fields=["decode_only"],
)
