"""The pure-jnp paged-attention reference against a brute-force numpy model."""

import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention


def brute_force(q, k_pages, v_pages, kv_lens, page_table, q_lens, sm_scale, sliding_window=None):
    """Per sequence: gather its keys densely, softmax with a causal mask, in float64."""
    out = np.zeros(q.shape, np.float64)
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    group = q.shape[1] // hkv
    start = 0
    for s, q_len in enumerate(q_lens):
        kv_len = kv_lens[s]
        pages = page_table[s, : -(-kv_len // page_size)] if kv_len else np.zeros(0, int)
        k = k_pages[pages].reshape(-1, hkv, q.shape[2])[:kv_len].astype(np.float64)
        v = v_pages[pages].reshape(-1, hkv, q.shape[2])[:kv_len].astype(np.float64)
        for i in range(q_len):
            pos = kv_len - q_len + i
            for h in range(q.shape[1]):
                scores = k[:, h // group] @ q[start + i, h].astype(np.float64) * sm_scale
                keep = np.arange(kv_len) <= pos
                if sliding_window is not None:
                    keep &= np.arange(kv_len) > pos - sliding_window
                if not keep.any():
                    continue
                p = np.exp(scores[keep] - scores[keep].max())
                out[start + i, h] = (p / p.sum()) @ v[keep, h // group]
        start += q_len
    return out


def random_batch(rng, q_lens, kv_lens, hq, hkv, d, page_size, num_pages, max_seqs, pad_tokens):
    pages_per_seq = max(1, max(-(-k // page_size) for k in kv_lens))
    perm = rng.permutation(np.arange(1, num_pages))
    page_table = np.zeros((max_seqs, pages_per_seq), np.int32)
    used = 0
    for s, kv_len in enumerate(kv_lens):
        n = -(-kv_len // page_size)
        page_table[s, :n] = perm[used : used + n]
        used += n
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1 : len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1 :] = cu[len(q_lens)]
    t = sum(q_lens) + pad_tokens
    q = rng.standard_normal((t, hq, d)).astype(np.float32)
    k = rng.standard_normal((num_pages, page_size, hkv, d)).astype(np.float32)
    v = rng.standard_normal((num_pages, page_size, hkv, d)).astype(np.float32)
    lens = np.zeros(max_seqs, np.int32)
    lens[: len(kv_lens)] = kv_lens
    return q, k, v, lens, page_table, cu


@pytest.mark.parametrize("page_size,block_tokens", [(4, 8), (8, 256), (16, 16)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 1)])
def test_reference_matches_brute_force(page_size, block_tokens, hq, hkv):
    import pallas_kernels.reference as ref

    rng = np.random.default_rng(page_size * 100 + hq * 10 + hkv)
    # prefill, extend on a cached prefix, decode, single token, exact pages
    q_lens = [7, 5, 1, 1, 3]
    kv_lens = [7, 5 + 2 * page_size + 3, 1, 40, 3 * page_size]
    q, k, v, lens, pt, cu = random_batch(rng, q_lens, kv_lens, hq, hkv, 16, page_size, 64, 8, 3)
    expect = brute_force(q, k, v, lens, pt, q_lens, 0.25)
    for block_q in (1, 4, 64, None):  # query blocks of one token, several, one per sequence, default
        got = ref.ragged_paged_attention(q, k, v, lens, pt, cu, np.array([len(q_lens)], np.int32),
                                         sm_scale=0.25, block_tokens=block_tokens, block_q=block_q)
        np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(got)[sum(q_lens):] == 0)


def test_reference_sliding_window_and_api():
    rng = np.random.default_rng(7)
    q_lens, kv_lens = [9, 1], [20, 33]
    q, k, v, lens, pt, cu = random_batch(rng, q_lens, kv_lens, 4, 2, 8, 4, 32, 2, 0)
    expect = brute_force(q, k, v, lens, pt, q_lens, 0.5, sliding_window=6)
    got = ragged_paged_attention(q, k, v, lens, pt, cu, np.array([2], np.int32), sm_scale=0.5,
                                 sliding_window=6, impl="reference")
    np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-5, atol=1e-5)
