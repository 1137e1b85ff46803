"""Decode kernels (Triton and TPU, interpret mode) against the decode reference.

Covering set: GQA {1, 3, 4, 8}, head_dim {64, 128}, page size {8, 16, 64}, both
dtypes, split counts {1, 2, 3, 4}, kv lengths {0 (padded slots), 1, partial page,
exact pages, long}, soft cap and sliding window, permuted page tables with garbage
past each sequence's pages.
"""

import functools

import jax
import numpy as np
import pytest

from pallas_kernels import paged_decode_reference, tpu_decode, triton_decode
from pallas_kernels.testing import Case, decode_inputs

from test_kernels_ragged import TOLERANCE


def decode_case(hq, hkv, head_dim, page_size, dtype, long, **kw):
    kv_lens = (1, page_size + 3, 2 * page_size, long)
    return Case(hq, hkv, head_dim, page_size, dtype, (1,) * len(kv_lens), kv_lens, max_seqs=6, **kw)


CASES = [
    (decode_case(4, 4, 128, 16, "float32", 77), 3),
    (decode_case(6, 2, 64, 8, "bfloat16", 45, seed=1), 1),
    (decode_case(8, 2, 128, 64, "float32", 150, soft_cap=4.0, sliding_window=70, seed=2), 2),
    (decode_case(8, 1, 64, 16, "bfloat16", 70, sliding_window=20, seed=3), 4),
]
KERNELS = {
    "triton": functools.partial(triton_decode.paged_decode, block_kv=16),
    "tpu": functools.partial(tpu_decode.paged_decode, block_kv=16),
}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("case,num_splits", CASES, ids=lambda c: c.id() if isinstance(c, Case) else f"splits{c}")
def test_decode_kernel_matches_reference(kernel, case, num_splits):
    args = decode_inputs(case)
    kw = dict(sm_scale=case.sm_scale, soft_cap=case.soft_cap, sliding_window=case.sliding_window)
    expect = paged_decode_reference(*args, **kw)
    got = jax.jit(functools.partial(KERNELS[kernel], **kw, num_splits=num_splits, interpret=True))(*args)
    assert got.shape == expect.shape and got.dtype == expect.dtype
    tol = TOLERANCE[case.dtype]
    got, expect = np.asarray(got, np.float32), np.asarray(expect, np.float32)
    np.testing.assert_allclose(got, expect, rtol=tol, atol=tol)
    assert np.all(got[len(case.kv_lens):] == 0), "padded slots (kv_len 0) must give zeros"
