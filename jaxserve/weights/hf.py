"""Read a HF checkpoint directory: config.json and one or many *.safetensors files.

The safetensors format is a little-endian u64 header length, a JSON header and raw
tensor bytes; reading it with a numpy memmap keeps loading zero-copy and lets bfloat16
through (via ml_dtypes) without torch or a device.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as read-only numpy arrays (memory-mapped)."""
    path = Path(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        tensors[name] = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def read_hf_config(path: str | Path) -> dict:
    """The config.json dict of a HF model directory."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json; expected a HF model directory")
    return json.loads(config_file.read_text())


def read_hf_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """{HF tensor name: array} of all *.safetensors files of a HF model directory."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files (only safetensors weights are supported)")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(read_safetensors(file))
    return tensors
