"""Decode GGUF quantized blocks into a grouped affine form, never via float weights.

Every kept type becomes integer codes `q` plus one float32 `scale` (and, except for
Q8_0, one float32 `offset`) per group of 32 consecutive elements of a row:

    w[r, 32*g + i] = q[r, 32*g + i] * scale[r, g] + offset[r, g]

which reproduces `gguf.quants.dequantize` exactly. Block layouts (little endian):

- Q8_0: 32 elements in 34 bytes: f16 d, 32 x int8 q.           w = d*q
- Q4_0: 32 elements in 18 bytes: f16 d, 16 bytes of nibbles.    w = d*(q-8)
- Q4_1: 32 elements in 20 bytes: f16 d, f16 m, 16 nibble bytes. w = d*q + m
  (for both, element i < 16 is the low nibble of byte i, element 16+i its high nibble)
- Q4_K: 256 elements in 144 bytes: f16 d, f16 dmin, 12 bytes packing 8 six-bit
  (scale, min) pairs, 128 nibble bytes in 4 chunks of 32; chunk c holds sub-block
  2c in its low nibbles and sub-block 2c+1 in its high nibbles.  w = d*sc_j*q - dmin*m_j
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType
KEPT = frozenset({Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K})
GROUP = 32


def _f16(b: np.ndarray) -> np.ndarray:
    """Bytes [..., 2] holding a little-endian float16 -> float32 [...]."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes [..., 16] -> codes [..., 32]: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes [..., 12] -> six-bit (scales, mins), each [..., 8].

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3 likewise;
    bytes 8-11 hold the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high
    nibble), whose top 2 bits are the top 2 bits of bytes 0-3 (scales) / 4-7 (mins).
    """
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, mn


def decode(
    raw: np.ndarray, qtype: GGMLQuantizationType | int, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Split a quantized [rows, cols] tensor into (q, scale, offset).

    raw: the tensor's bytes (GGUFReader's `tensor.data`: uint8 [rows, bytes_per_row];
    any shape or uint8 view of the same bytes is accepted).
    Returns q [rows, cols] (int8 for Q8_0, uint8 in 0..15 for the 4-bit types),
    scale [rows, cols // 32] float32 and offset of the same shape (None for Q8_0).
    """
    qtype = GGMLQuantizationType(qtype)
    if qtype not in KEPT:
        kept = ", ".join(sorted(t.name for t in KEPT))
        raise ValueError(f"GGUF type {qtype.name} is not kept quantized (kept: {kept})")
    block, nbytes = GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"{qtype.name} needs cols divisible by {block}, got {cols}")
    data = np.ascontiguousarray(raw).view(np.uint8)
    if data.size != rows * (cols // block) * nbytes:
        raise ValueError(
            f"{qtype.name} [{rows}, {cols}] needs {rows * (cols // block) * nbytes} bytes, got {data.size}"
        )
    blocks = data.reshape(rows, cols // block, nbytes)
    groups = (rows, cols // GROUP)

    if qtype == Q.Q8_0:
        q = blocks[..., 2:].view(np.int8).reshape(rows, cols)
        return q, _f16(blocks[..., 0:2]).reshape(groups), None
    if qtype == Q.Q4_0:
        d = _f16(blocks[..., 0:2])
        q = _nibbles(blocks[..., 2:]).reshape(rows, cols)
        return q, d, np.float32(-8.0) * d
    if qtype == Q.Q4_1:
        q = _nibbles(blocks[..., 4:]).reshape(rows, cols)
        return q, _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])

    # Q4_K: one super-block of 256 = 8 groups of 32.
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    sc, mn = _q4k_scales(blocks[..., 4:16])
    scale = d[..., None] * sc.astype(np.float32)
    offset = -(dmin[..., None] * mn.astype(np.float32))
    qs = blocks[..., 16:].reshape(rows, cols // block, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(rows, cols)
    return q, scale.reshape(groups), offset.reshape(groups)


def reconstruct(q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """float32 [rows, cols] weights from decode's output."""
    rows, cols = q.shape
    w = q.astype(np.float32).reshape(rows, cols // GROUP, GROUP) * scale[..., None]
    if offset is not None:
        w = w + offset[..., None]
    return w.reshape(rows, cols)
