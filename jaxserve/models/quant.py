"""Weight-only quantized linear layers and embeddings.

A quantized weight is a grouped affine code: `w = q * scale + offset`, with `q` stored in a
narrow dtype, one `scale` (and optionally one `offset`) per output channel and per group of
`group` input rows. A `QuantFormat` names the storage; `QuantLinear` replaces `nnx.Linear`
with the same `kernel` name (so sharding rules apply unchanged) plus `scale` / `offset`.

Per-channel formats (`group == 0`) apply the scale after the matmul, `(x @ q) * scale`, so
the only full-precision operand is the activation. Grouped formats (GGUF's blocks of 32)
dequantize one matrix, then multiply. XLA on CPU converts the narrow weight into a
temporary of one matrix before its dot (the whole model is never materialised; see
docs/BENCHMARKS.md for what that costs); on GPUs XLA's Triton GEMM emitter fuses the convert.

A format with a `dot_dtype` runs its dots on operands of that dtype, accumulating in
float32, whatever the activations' dtype: `w8a16` is `int8` with the activation rounded to
bfloat16 at each dot (int8 codes are exact in bfloat16). The residual stream, the norms and
attention stay in `--dtype`; on CPUs with bfloat16 dot instructions this is the fast path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

_INIT = nnx.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    name: str
    dtype: object  # numpy storage dtype of q
    group: int = 0  # input rows per scale; 0 = one scale per output channel
    offset: bool = False  # affine (scale and offset) rather than symmetric
    qmax: float = 127.0  # largest |q| of a symmetric format
    dot_dtype: object = None  # the dots' operand dtype (None: the activation's)

    @property
    def bits(self) -> int:
        return 4 if self.dtype in (ml_dtypes.uint4, ml_dtypes.int4) else 8


# --quantization int8 / fp8: per output channel, symmetric.
INT8 = QuantFormat("int8", np.dtype(np.int8))
FP8 = QuantFormat("fp8", np.dtype(ml_dtypes.float8_e4m3fn), qmax=448.0)
# --quantization w8a16: the int8 weights, dots on bfloat16 operands with float32 accumulation.
W8A16 = QuantFormat("w8a16", np.dtype(np.int8), dot_dtype=jnp.bfloat16)
# GGUF blocks kept as they are (weights/gguf_quant.py): Q8_0, and Q4_0 / Q4_1 / Q4_K as 4-bit affine.
Q8_0 = QuantFormat("q8_0", np.dtype(np.int8), group=32)
Q4 = QuantFormat("q4", np.dtype(np.uint8), group=32, offset=True)
FORMATS = {f.name: f for f in (INT8, FP8, W8A16, Q8_0, Q4)}


def quantize(w: np.ndarray, fmt: QuantFormat) -> dict[str, np.ndarray]:
    """Symmetric per-channel quantization of float weights `[..., in, out]` (a linear's kernel)."""
    if fmt.group or fmt.offset:
        raise ValueError(f"{fmt.name} weights come from GGUF blocks, not from float weights")
    w = np.asarray(w, np.float32)
    absmax = np.abs(w).max(axis=-2, keepdims=True)
    scale = np.where(absmax > 0, absmax / fmt.qmax, 1.0).astype(np.float32)
    q = w / scale
    q = np.clip(np.round(q), -fmt.qmax, fmt.qmax) if fmt.dtype == np.int8 else q
    return {"kernel": q.astype(fmt.dtype), "scale": scale}


def dequantize(p: dict, dtype=jnp.float32):
    """The float weight `[..., in, out]` of a quantized param dict (jnp; used by grouped formats and tests)."""
    q = p["kernel"]
    groups = p["scale"].shape[-2]
    shape = q.shape
    w = q.astype(jnp.float32).reshape(*shape[:-2], groups, shape[-2] // groups, shape[-1])
    w = w * p["scale"][..., None, :]
    if "offset" in p:
        w = w + p["offset"][..., None, :]
    return w.reshape(shape).astype(dtype)


def _apply(x, p: dict, contract: str, dot_dtype=None):
    """x @ W for a quantized W; `contract` is the einsum of x and the [in, out] or [out, in] weight."""
    x = x.astype(dot_dtype or x.dtype)
    if p["scale"].shape[-2] == 1 and "offset" not in p:  # per channel: scale after the dot
        y = jnp.einsum(contract, x, p["kernel"].astype(x.dtype), preferred_element_type=jnp.float32)
        return y * p["scale"][0]
    w = dequantize(p, x.dtype)
    return jnp.einsum(contract, x, w, preferred_element_type=jnp.float32)


class QuantLinear(nnx.Module):
    """`nnx.Linear` over a quantized kernel `[in, out]`; the output has the activation's dtype."""

    def __init__(self, din: int, dout: int, *, use_bias: bool, dtype, fmt: QuantFormat, rngs: nnx.Rngs):
        groups = din // fmt.group if fmt.group else 1
        self.kernel = nnx.Param(_INIT(rngs.params(), (din, dout), jnp.float32).astype(fmt.dtype))
        self.scale = nnx.Param(jnp.ones((groups, dout), jnp.float32))
        if fmt.offset:
            self.offset = nnx.Param(jnp.zeros((groups, dout), jnp.float32))
        if use_bias:
            self.bias = nnx.Param(jnp.zeros((dout,), dtype))
        self.dot_dtype = fmt.dot_dtype

    def __call__(self, x):
        p = {"kernel": self.kernel[...], "scale": self.scale[...]}
        if hasattr(self, "offset"):
            p["offset"] = self.offset[...]
        y = _apply(x, p, "...i,io->...o", self.dot_dtype)
        if hasattr(self, "bias"):
            y = y + self.bias[...]
        return y.astype(x.dtype)


class QuantEmbed(nnx.Module):
    """A token embedding `[vocab, hidden]` quantized per vocabulary row; `attend` is the tied LM head."""

    def __init__(self, vocab: int, hidden: int, *, dtype, fmt: QuantFormat, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_INIT(rngs.params(), (vocab, hidden), jnp.float32).astype(fmt.dtype))
        self.scale = nnx.Param(jnp.ones((vocab, 1), jnp.float32))
        self.dtype = dtype
        self.dot_dtype = fmt.dot_dtype

    def __call__(self, ids):
        rows = self.embedding[...][ids].astype(jnp.float32) * self.scale[...][ids]
        return rows.astype(self.dtype)

    def attend(self, hidden):
        """Float32 logits `[N, vocab]`: the scale is per output (vocab) channel, applied after the dot.

        On CPU the table is converted a block of rows at a time: converting all of it at once
        writes a fresh temporary of the full-precision table every step (113 MB for SmolLM2,
        ~35 ms of page faults); blocks of ~4096 rows reuse one small buffer (2 ms)."""
        table = self.embedding[...]
        vocab, dim = table.shape
        blocks = _row_blocks(vocab) if jax.default_backend() == "cpu" else 1
        hidden = hidden.astype(self.dot_dtype or hidden.dtype)

        def block(rows):
            return jnp.einsum("nh,vh->nv", hidden, rows.astype(hidden.dtype), preferred_element_type=jnp.float32)

        y = jax.lax.map(block, table.reshape(blocks, vocab // blocks, dim))  # [blocks, N, vocab // blocks]
        return jnp.moveaxis(y, 0, 1).reshape(hidden.shape[0], vocab) * self.scale[...][:, 0]


def _row_blocks(rows: int, target: int = 4096) -> int:
    """The fewest equal blocks of at most `target` rows (1 when `rows` has no such divisor)."""
    for n in range(-(-rows // target), rows // 256 + 1):
        if rows % n == 0:
            return n
    return 1


def quantize_embedding(e: np.ndarray, fmt: QuantFormat) -> dict[str, np.ndarray]:
    """Per-row quantization of an embedding `[vocab, hidden]` (rows are the head's output channels)."""
    p = quantize(np.asarray(e, np.float32).T, fmt)
    return {"embedding": p["kernel"].T, "scale": p["scale"].T}
