"""Ragged paged-attention kernels (Triton and TPU, interpret mode) against the reference.

A covering set, not the cartesian product: every GQA ratio {1, 3, 4, 8}, head_dim
{64, 128}, page size {8, 16, 64} and dtype appears, and every batch mixes prefill,
extend, decode, kv lengths {0, 1, partial page, exact pages, long}, padded sequences,
padded tokens and permuted page tables (`pallas_kernels.testing`). Small blocks make
the kernels loop over several query and key blocks.
"""

import functools

import jax
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention_reference, tpu_ragged, triton_ragged
from pallas_kernels.testing import Case, mixed_batch, ragged_inputs

CASES = [
    Case(4, 4, 64, 8, "float32", *mixed_batch(8, 45), max_seqs=8, pad_tokens=3),
    Case(6, 2, 128, 16, "bfloat16", *mixed_batch(16, 70), max_seqs=7, pad_tokens=1, soft_cap=5.0, seed=1),
    Case(8, 2, 64, 64, "float32", *mixed_batch(64, 150), max_seqs=6, sliding_window=19, seed=2),
    Case(8, 1, 128, 8, "bfloat16", *mixed_batch(8, 33), max_seqs=9, pad_tokens=5, soft_cap=3.0,
         sliding_window=7, seed=3),
]
KERNELS = {
    "triton": functools.partial(triton_ragged.ragged_paged_attention, block_q=4, block_kv=16),
    "tpu": functools.partial(tpu_ragged.ragged_paged_attention, block_q=8, block_kv=16),
}
# fp32: the kernels reduce in the same order as the reference up to the block size.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def check_close(got, expect, dtype, num_real_tokens):
    tol = TOLERANCE[dtype]
    got, expect = np.asarray(got, np.float32), np.asarray(expect, np.float32)
    np.testing.assert_allclose(got, expect, rtol=tol, atol=tol)
    assert np.all(got[num_real_tokens:] == 0), "padded tokens must give zeros"


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_ragged_kernel_matches_reference(kernel, case):
    args = ragged_inputs(case)
    kw = dict(sm_scale=case.sm_scale, soft_cap=case.soft_cap, sliding_window=case.sliding_window)
    expect = ragged_paged_attention_reference(*args, **kw)
    got = jax.jit(functools.partial(KERNELS[kernel], **kw, interpret=True))(*args)
    assert got.shape == expect.shape and got.dtype == expect.dtype
    check_close(got, expect, case.dtype, sum(case.q_lens))
