"""Weight-only quantization (models/quant.py): each format's matmul against its dequantized
reference in float64 (on the activation rounded to the format's dot dtype, if it has one),
the quantization error bound, and the quantized embedding / LM head."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.models import quant
from jaxserve.models.quant import QuantEmbed, QuantLinear

SEED = int(np.random.SeedSequence().entropy % 2**32)  # fresh inputs each run; in the test ids


def _random_params(fmt, din, dout, rng) -> dict:
    """Float weights quantized (per-channel formats) or random codes with scales (GGUF's)."""
    if not fmt.group:
        return quant.quantize(rng.standard_normal((din, dout)).astype(np.float32) * 0.05, fmt)
    groups = din // fmt.group
    low, high = (-128, 128) if fmt.dtype == np.int8 else (0, 16)
    p = {"kernel": rng.integers(low, high, size=(din, dout)).astype(fmt.dtype),
         "scale": (rng.random((groups, dout)) * 0.01).astype(np.float32)}
    if fmt.offset:
        p["offset"] = (rng.standard_normal((groups, dout)) * 0.05).astype(np.float32)
    return p


def _dot_input64(x: np.ndarray, fmt) -> np.ndarray:
    """The activation as the format's dots see it: rounded to its dot dtype (w8a16: bfloat16)."""
    return np.asarray(jnp.asarray(x).astype(fmt.dot_dtype) if fmt.dot_dtype else x, np.float64)


def _dequantize64(p: dict) -> np.ndarray:
    q = np.asarray(p["kernel"]).astype(np.float64)
    groups = p["scale"].shape[0]
    w = q.reshape(groups, -1, q.shape[1]) * np.asarray(p["scale"], np.float64)[:, None]
    if "offset" in p:
        w = w + np.asarray(p["offset"], np.float64)[:, None]
    return w.reshape(q.shape)


@pytest.mark.parametrize("seed", [SEED])
@pytest.mark.parametrize("name", sorted(quant.FORMATS))
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_matmul_equals_dequantized_reference(name, bias, seed):
    fmt = quant.FORMATS[name]
    rng = np.random.default_rng(seed)
    din, dout, tokens = 96, 80, 7
    p = _random_params(fmt, din, dout, rng)
    layer = QuantLinear(din, dout, use_bias=bias, dtype=jnp.float32, fmt=fmt, rngs=nnx.Rngs(0))
    for key, value in p.items():
        getattr(layer, key)[...] = jnp.asarray(value)
    b = rng.standard_normal(dout).astype(np.float32)
    if bias:
        layer.bias[...] = jnp.asarray(b)
    x = rng.standard_normal((tokens, din)).astype(np.float32)
    ref = _dot_input64(x, fmt) @ _dequantize64(p) + (b if bias else 0)
    y = layer(jnp.asarray(x))
    assert y.dtype == jnp.float32 and y.shape == (tokens, dout)
    out = np.asarray(y, np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(quant.dequantize(p)), _dequantize64(p), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", [SEED])
@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_quantization_error_bound(name, seed):
    fmt = quant.FORMATS[name]
    w = np.random.default_rng(seed).standard_normal((3, 64, 48)).astype(np.float32)
    w[1, :, 5] = 0  # an all-zero channel
    p = quant.quantize(w, fmt)
    assert p["kernel"].dtype == fmt.dtype and p["scale"].shape == (3, 1, 48)
    err = np.abs(_dequantize64({"kernel": p["kernel"][1], "scale": p["scale"][1]}) - w[1])
    if name == "int8":  # rounding to the nearest code: half a step per channel
        assert np.all(err <= p["scale"][1] / 2 + 1e-7)
    else:  # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 above the subnormals
        assert np.all(err <= np.abs(w[1]) / 16 + p["scale"][1] * 2.0**-9)
    assert np.all(err[:, 5] == 0)
    np.testing.assert_array_equal(np.abs(p["kernel"]).max(axis=-2).astype(np.float32)[[0, 2]], fmt.qmax)


@pytest.mark.parametrize("seed", [SEED])
@pytest.mark.parametrize("name", ["int8", "w8a16", "fp8"])
def test_quantized_embedding_and_tied_head(name, seed):
    fmt = quant.FORMATS[name]
    rng = np.random.default_rng(seed)
    vocab, hidden = 50, 32
    p = quant.quantize_embedding(rng.standard_normal((vocab, hidden)).astype(np.float32), fmt)
    embed = QuantEmbed(vocab, hidden, dtype=jnp.float32, fmt=fmt, rngs=nnx.Rngs(0))
    embed.embedding[...], embed.scale[...] = jnp.asarray(p["embedding"]), jnp.asarray(p["scale"])
    table = p["embedding"].astype(np.float64) * p["scale"]
    ids = rng.integers(0, vocab, size=9)
    np.testing.assert_allclose(np.asarray(embed(jnp.asarray(ids))), table[ids], rtol=1e-6)
    h = rng.standard_normal((4, hidden)).astype(np.float32)
    ref = _dot_input64(h, fmt) @ table.T
    np.testing.assert_allclose(np.asarray(embed.attend(jnp.asarray(h))), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_grouped_formats_refuse_float_weights():
    with pytest.raises(ValueError, match="GGUF"):
        quant.quantize(np.ones((64, 8), np.float32), quant.Q4)
