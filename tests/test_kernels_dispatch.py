"""The one-API dispatch: impl names, reference fallback with a single log line, and the
kernels inside jit + lax.scan over a stacked per-layer cache (how the model calls
them), plus the TPU kernels under the interpret-mode race detector."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels
from pallas_kernels import dispatch, tpu_decode, tpu_ragged
from pallas_kernels.testing import Case, decode_inputs, mixed_batch, ragged_inputs

SMALL = Case(6, 2, 64, 16, "float32", *mixed_batch(16, 40), max_seqs=7, pad_tokens=2)
SMALL_DECODE = dataclasses.replace(SMALL, q_lens=(1, 1, 1), kv_lens=(1, 19, 40))
BLOCK_Q = {"triton": 4, "tpu": 8}


def test_resolve_impl_on_cpu():
    assert jax.default_backend() == "cpu"
    assert pallas_kernels.resolve_impl("auto") == "reference"
    assert pallas_kernels.resolve_impl("pallas", interpret=True) == "triton"
    assert pallas_kernels.resolve_impl("tpu", interpret=True) == "tpu"
    for impl in ("triton", "tpu", "pallas"):
        with pytest.raises(ValueError, match="interpret=True"):
            pallas_kernels.resolve_impl(impl)
    with pytest.raises(ValueError, match="unknown attention impl"):
        pallas_kernels.resolve_impl("flash")


def test_auto_on_cpu_is_the_reference():
    args = ragged_inputs(SMALL)
    got = pallas_kernels.ragged_paged_attention(*args, sm_scale=0.1)
    expect = pallas_kernels.ragged_paged_attention_reference(*args, sm_scale=0.1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expect))


@pytest.mark.parametrize("impl,case", [
    ("triton", dataclasses.replace(SMALL, head_dim=96)),  # not a power of two
    ("tpu", dataclasses.replace(SMALL_DECODE, dtype="bfloat16", page_size=8)),  # sub-tile pages
])
def test_unsupported_shape_falls_back_with_one_log_line(impl, case, caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_logged_reasons", set())
    decode = case.q_lens == (1,) * len(case.q_lens)
    op = pallas_kernels.paged_decode if decode else pallas_kernels.ragged_paged_attention
    ref = pallas_kernels.paged_decode_reference if decode else pallas_kernels.ragged_paged_attention_reference
    args = decode_inputs(case) if decode else ragged_inputs(case)
    with caplog.at_level(logging.WARNING, logger="pallas_kernels"):
        for _ in range(2):
            got = op(*args, sm_scale=0.1, impl=impl, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref(*args, sm_scale=0.1)))
    assert len(caplog.records) == 1, caplog.records
    assert f"the {impl} kernel does not support" in caplog.records[0].getMessage()


@pytest.mark.parametrize("impl", ["triton", "tpu"])
def test_kernels_inside_jit_and_scan_over_layers(impl):
    """Two layers scanned over a stacked [L, P, S, Hkv, D] cache, both cache patterns:
    the ragged op reads the layer's slice (scan xs); the decode op follows the model,
    which carries the pool flattened to [L * P, ...], writes the new K/V into it and
    offsets the page table by layer * P."""
    q, k, v, kv_lens, table, cu, num_seqs = ragged_inputs(SMALL)
    dq, _, _, dlens, dtable = decode_inputs(dataclasses.replace(SMALL_DECODE, seed=5))
    rng = np.random.default_rng(11)
    k_cache = jnp.stack([k, jnp.asarray(rng.standard_normal(k.shape), k.dtype)])
    v_cache = jnp.stack([v, jnp.asarray(rng.standard_normal(v.shape), v.dtype)])
    num_layers, num_pages = k_cache.shape[:2]
    dtable = np.minimum(dtable, num_pages - 1)
    hkv = k.shape[2]

    def model(impl, q, dq, k_cache, v_cache):
        kw = dict(sm_scale=0.125, impl=impl, interpret=impl != "reference")
        kernel_kw = dict(block_kv=16) if impl != "reference" else {}
        ragged_kw = dict(kernel_kw, block_q=BLOCK_Q[impl]) if kernel_kw else {}

        def layer(carry, kv):
            x, dx, k_flat, v_flat, i = carry
            k_pages, v_pages = kv
            x = pallas_kernels.ragged_paged_attention(x, k_pages, v_pages, kv_lens, table, cu, num_seqs,
                                                      **kw, **ragged_kw)
            slots = i * num_pages + dtable[:, 0]  # row 0 of each sequence's first page
            k_flat = k_flat.at[slots, 0].set(dx[:, :hkv])
            v_flat = v_flat.at[slots, 0].set(-dx[:, :hkv])
            dx = pallas_kernels.paged_decode(dx, k_flat, v_flat, dlens, dtable + i * num_pages,
                                             num_splits=2, **kw, **kernel_kw)
            return (x * 2.0, dx * 2.0, k_flat, v_flat, i + 1), None

        flat = (num_layers * num_pages, *k_cache.shape[2:])
        init = (q, dq, k_cache.reshape(flat), v_cache.reshape(flat), jnp.int32(0))
        (x, dx, k_flat, _, _), _ = jax.lax.scan(layer, init, (k_cache, v_cache))
        return x, dx, k_flat

    got = jax.jit(functools.partial(model, impl))(q, dq, k_cache, v_cache)
    expect = jax.jit(functools.partial(model, "reference"))(q, dq, k_cache, v_cache)
    for g, e in zip(got, expect):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_tpu_kernels_have_no_races():
    """TPU interpret mode with the race detector and two simulated TensorCores."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret  # races state

    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    runs = [
        (functools.partial(tpu_ragged.ragged_paged_attention, block_q=8, block_kv=32),
         pallas_kernels.ragged_paged_attention_reference, ragged_inputs(SMALL)),
        (functools.partial(tpu_decode.paged_decode, num_splits=2, block_kv=16),
         pallas_kernels.paged_decode_reference, decode_inputs(SMALL_DECODE)),
    ]
    for kernel, reference, args in runs:
        out = kernel(*args, sm_scale=0.1, interpret=params)
        assert not tpu_interpret.races.races_found
        np.testing.assert_allclose(np.asarray(out), np.asarray(reference(*args, sm_scale=0.1)),
                                   rtol=1e-5, atol=1e-5)
