"""The jnp references (ragged and decode) against a float64 brute force.

The kernels are checked against these references, so the references themselves are
checked here on the same problem generator, including soft cap and sliding window.
"""

import dataclasses

import numpy as np
import pytest

from pallas_kernels import paged_decode_reference, ragged_paged_attention_reference
from pallas_kernels.testing import Case, brute_force, decode_inputs, mixed_batch, ragged_inputs

CASES = [
    Case(4, 4, 64, 8, "float32", *mixed_batch(8, 45), max_seqs=8, pad_tokens=3),
    Case(6, 2, 128, 16, "float32", *mixed_batch(16, 70), max_seqs=7, pad_tokens=1, soft_cap=5.0, seed=1),
    Case(8, 2, 64, 64, "float32", *mixed_batch(64, 200), max_seqs=6, sliding_window=19, seed=2),
    Case(8, 1, 64, 16, "float32", *mixed_batch(16, 33), max_seqs=9, soft_cap=3.0, sliding_window=7, seed=3),
]


@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_ragged_reference_matches_brute_force(case):
    args = ragged_inputs(case)
    kw = dict(sm_scale=case.sm_scale, soft_cap=case.soft_cap, sliding_window=case.sliding_window)
    expect = brute_force(*args[:5], case.q_lens, **kw)
    got = ragged_paged_attention_reference(*args, **kw, block_tokens=32)
    np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_decode_reference_matches_brute_force(case, num_splits):
    kv_lens = [max(1, n) for n in case.kv_lens]  # decode: every real sequence has a key
    case = dataclasses.replace(case, q_lens=(1,) * len(kv_lens), kv_lens=tuple(kv_lens))
    q, k, v, lens, table = decode_inputs(case)
    kw = dict(sm_scale=case.sm_scale, soft_cap=case.soft_cap, sliding_window=case.sliding_window)
    expect = brute_force(q, k, v, lens, table, [1] * q.shape[0], **kw)
    got = paged_decode_reference(q, k, v, lens, table, **kw, num_splits=num_splits, block_tokens=16)
    np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[len(kv_lens):] == 0)  # padded slots (kv_len 0)
