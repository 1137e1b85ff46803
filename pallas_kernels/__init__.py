"""Paged-attention kernels behind one API, each with a pure-jnp reference.

See `reference.py` for the KV page layout and the ragged-batch conventions.
"""

from pallas_kernels.reference import ragged_paged_attention as ragged_paged_attention_reference


def ragged_paged_attention(
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
    sm_scale, soft_cap=None, sliding_window=None, impl="auto", interpret=False,
):
    """Attention of a ragged batch (prefill, extend and decode mixed) over paged KV.

    q [T, Hq, D]; k_pages, v_pages [num_pages, page_size, Hkv, D]; kv_lens [max_seqs];
    page_table [max_seqs, pages_per_seq]; cu_q_lens [max_seqs + 1]; num_seqs [1].
    Returns [T, Hq, D]; padded tokens give zeros.
    """
    if impl not in ("auto", "reference"):
        raise ValueError(f"unknown attention impl {impl!r}; expected 'auto' or 'reference'")
    return ragged_paged_attention_reference(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
        sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
    )


__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference"]
