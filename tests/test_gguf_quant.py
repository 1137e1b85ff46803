"""jaxserve.weights.gguf_quant.decode against gguf's own numpy dequantizer."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

from jaxserve.weights.gguf_quant import GROUP, KEPT, decode, reconstruct

# Two fixed seeds plus a fresh one each run; the seed shows in the test id.
SEEDS = [0, 1, int(np.random.SeedSequence().entropy % 2**32)]
TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K]
F16_FIELDS = {Q.Q8_0: 1, Q.Q4_0: 1, Q.Q4_1: 2, Q.Q4_K: 2}  # leading f16 fields per block


def _random_f16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random finite float16 bit patterns (any sign, subnormals included) as uint16."""
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    inf_nan = (bits & 0x7C00) == 0x7C00
    return np.where(inf_nan, bits & ~np.uint16(0x4000), bits).astype("<u2")


def _random_raw(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Random blocks as GGUFReader gives them: uint8 [rows, bytes_per_row]."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    n = F16_FIELDS[qtype]
    blocks[..., : 2 * n] = _random_f16(rng, (rows, cols // block, n)).view(np.uint8)
    return blocks.reshape(rows, -1)


def _check(raw: np.ndarray, qtype: Q, rows: int, cols: int) -> None:
    q, scale, offset = decode(raw, qtype, rows, cols)
    assert q.shape == (rows, cols)
    assert scale.shape == (rows, cols // GROUP) and scale.dtype == np.float32
    if qtype == Q.Q8_0:
        assert q.dtype == np.int8 and offset is None
    else:
        assert q.dtype == np.uint8 and int(q.max()) <= 15
        assert offset is not None and offset.shape == scale.shape and offset.dtype == np.float32
    want = dequantize(raw, qtype).reshape(rows, cols)
    got = reconstruct(q, scale, offset)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_blocks_match_gguf(qtype: Q, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for rows, cols in [(6, 256), (3, 512)]:
        _check(_random_raw(rng, qtype, rows, cols), qtype, rows, cols)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_quantized_weights_match_gguf(qtype: Q, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 512)).astype(np.float32) * rng.uniform(0.01, 3.0, (6, 1)).astype(np.float32)
    w[0, :GROUP] = 0.0  # an all-zero group (d == 0)
    try:
        raw = quantize(w, qtype)
    except NotImplementedError:
        pytest.skip(f"gguf cannot quantize {qtype.name}")
    _check(raw, qtype, *w.shape)
    # the round trip is a reasonable approximation of w
    err = np.abs(reconstruct(*decode(raw, qtype, *w.shape)) - w).max()
    assert err < 0.25 * np.abs(w).max()


def test_code_ranges() -> None:
    rng = np.random.default_rng(0)
    for qtype in TYPES:
        q, _, _ = decode(_random_raw(rng, qtype, 8, 512), qtype, 8, 512)
        lo, hi = (-128, 127) if qtype == Q.Q8_0 else (0, 15)
        assert int(q.min()) == lo and int(q.max()) == hi, qtype.name


def test_flat_bytes_and_int_qtype() -> None:
    raw = _random_raw(np.random.default_rng(3), Q.Q4_K, 2, 256)
    a = decode(raw, Q.Q4_K, 2, 256)
    b = decode(raw.ravel(), int(Q.Q4_K), 2, 256)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_kept_types() -> None:
    assert KEPT == set(TYPES)


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q5_0, Q.F16], ids=lambda t: t.name)
def test_unsupported_type_raises(qtype: Q) -> None:
    with pytest.raises(ValueError, match=qtype.name):
        decode(np.zeros((2, 1024), np.uint8), qtype, 2, 256)


def test_bad_sizes_raise() -> None:
    raw = _random_raw(np.random.default_rng(0), Q.Q8_0, 2, 64)
    with pytest.raises(ValueError, match="bytes"):
        decode(raw, Q.Q8_0, 2, 96)
    with pytest.raises(ValueError, match="divisible"):
        decode(raw, Q.Q4_K, 2, 128)

