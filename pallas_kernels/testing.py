"""Random paged-attention problems and a float64 brute force, for tests and benchmarks.

Inputs are fresh random normals (never zeros), page tables are random permutations,
and the unused page-table entries and padded sequences hold garbage (real page ids,
nonzero lengths) so that an implementation reading past a sequence's pages or
ignoring num_seqs gets caught.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: head layout, paging, dtype and the ragged batch."""
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str  # "float32" | "bfloat16"
    q_lens: tuple[int, ...]  # per real sequence; 1 everywhere for a decode
    kv_lens: tuple[int, ...]  # per real sequence, including the new tokens
    max_seqs: int  # >= len(q_lens); the rest are padding sequences
    pad_tokens: int = 0  # padded query tokens after the real ones
    soft_cap: float | None = None
    sliding_window: int | None = None
    seed: int = 0

    @property
    def sm_scale(self) -> float:
        return self.head_dim ** -0.5

    def id(self) -> str:
        extra = "".join([f"-cap{self.soft_cap}" if self.soft_cap else "",
                         f"-win{self.sliding_window}" if self.sliding_window else ""])
        return (f"h{self.num_q_heads}x{self.num_kv_heads}-d{self.head_dim}-p{self.page_size}-"
                f"{self.dtype}{extra}")


def _pages(rng, case: Case):
    """(page_table [max_seqs, pages_per_seq], num_pages) with disjoint random pages."""
    need = [-(-n // case.page_size) for n in case.kv_lens]
    pages_per_seq = max(1, max(need) + 1)  # one spare column of garbage
    num_pages = 1 + sum(need) + 2  # page 0 dummy + a couple never referenced
    perm = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    # Garbage everywhere first: real page ids that belong to someone else.
    table = rng.integers(0, num_pages, (case.max_seqs, pages_per_seq)).astype(np.int32)
    used = 0
    for s, n in enumerate(need):
        table[s, :n] = perm[used: used + n]
        used += n
    return table, num_pages


def _cast(x, dtype):
    import jax.numpy as jnp
    return jnp.asarray(x, dtype=jnp.dtype(dtype))


def ragged_inputs(case: Case):
    """Arrays for ragged_paged_attention: (q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)."""
    rng = np.random.default_rng(case.seed)
    assert all(q <= k for q, k in zip(case.q_lens, case.kv_lens))
    table, num_pages = _pages(rng, case)
    num_seqs = len(case.q_lens)
    cu = np.zeros(case.max_seqs + 1, np.int32)
    cu[1: num_seqs + 1] = np.cumsum(case.q_lens)
    cu[num_seqs + 1:] = cu[num_seqs]
    kv_lens = rng.integers(1, 5, case.max_seqs).astype(np.int32)  # garbage for padding seqs
    kv_lens[:num_seqs] = case.kv_lens
    num_tokens = int(cu[num_seqs]) + case.pad_tokens
    shape = (num_pages, case.page_size, case.num_kv_heads, case.head_dim)
    q = rng.standard_normal((num_tokens, case.num_q_heads, case.head_dim), np.float32)
    k = rng.standard_normal(shape, np.float32)
    v = rng.standard_normal(shape, np.float32)
    return (_cast(q, case.dtype), _cast(k, case.dtype), _cast(v, case.dtype), kv_lens, table, cu,
            np.array([num_seqs], np.int32))


def decode_inputs(case: Case):
    """Arrays for paged_decode: (q [B, Hq, D], k_pages, v_pages, kv_lens [B], page_table [B, pps]).

    Sequences past len(kv_lens) are padding with kv_len 0 (the engine's padded slots).
    """
    assert all(n == 1 for n in case.q_lens)
    q, k, v, kv_lens, table, _, _ = ragged_inputs(dataclasses.replace(case, pad_tokens=0))
    padded = np.zeros(case.max_seqs, np.int32)
    padded[: len(case.kv_lens)] = case.kv_lens
    batch_q = np.zeros((case.max_seqs, *q.shape[1:]), np.float32)
    batch_q[: q.shape[0]] = np.asarray(q, np.float32)
    rng = np.random.default_rng(case.seed + 1)
    batch_q[q.shape[0]:] = rng.standard_normal(batch_q[q.shape[0]:].shape)
    return _cast(batch_q, case.dtype), k, v, padded, table


def brute_force(q, k_pages, v_pages, kv_lens, page_table, q_lens, *, sm_scale,
                soft_cap=None, sliding_window=None):
    """Dense float64 attention per sequence; rows of padding tokens are zero."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    num_tokens, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = num_q_heads // num_kv_heads
    out = np.zeros(q.shape, np.float64)
    start = 0
    for s, q_len in enumerate(q_lens):
        kv_len = int(kv_lens[s])
        if q_len == 0 or kv_len == 0:  # no keys: the output stays zero
            start += q_len
            continue
        pages = page_table[s, : -(-kv_len // page_size)]
        k = k_pages[pages].reshape(-1, num_kv_heads, head_dim)[:kv_len]  # [kv_len, Hkv, D]
        v = v_pages[pages].reshape(-1, num_kv_heads, head_dim)[:kv_len]
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [kv_len, Hq, D]
        qs = q[start: start + q_len]  # [q_len, Hq, D]
        scores = np.einsum("qhd,khd->hqk", qs, k) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * np.tanh(scores / soft_cap)
        q_pos = kv_len - q_len + np.arange(q_len)[:, None]
        k_pos = np.arange(kv_len)[None, :]
        keep = k_pos <= q_pos
        if sliding_window is not None:
            keep &= k_pos > q_pos - sliding_window
        scores = np.where(keep[None], scores, -np.inf)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out[start: start + q_len] = np.einsum("hqk,khd->qhd", p, v)
        start += q_len
    return out


def mixed_batch(page_size: int, long: int):
    """(q_lens, kv_lens) of a batch mixing every kind of sequence and kv length.

    prefill on a partial page, extend over exact pages + a partial one, decode on a
    long context, an empty sequence (kv_len 0), a one-token prefill (kv_len 1), and an
    extend ending exactly on a page boundary.
    """
    s = page_size
    q_lens = (11, 6, 1, 0, 1, 3)
    kv_lens = (11, 2 * s + 5, long, 0, 1, 3 * s)
    return q_lens, kv_lens
