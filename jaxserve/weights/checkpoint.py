"""Converted checkpoints: an orbax checkpoint of the params plus config and tokenizer files.

Layout of a converted directory:
    config.json                 HF-style config (jaxserve reads it with ModelConfig.from_hf)
    tokenizer.json, tokenizer_config.json
    jaxserve_params/            orbax checkpoint of the pure-dict param tree
Restoring reads each array straight into its target sharding.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

PARAMS_DIR = "jaxserve_params"


def is_converted(path: str | Path) -> bool:
    return (Path(path) / PARAMS_DIR).is_dir()


def save_params(path: str | Path, params: dict, hf_config: dict) -> None:
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS_DIR, params, force=True)


def restore_params(path: str | Path, abstract_params: dict) -> dict:
    """Restore into the dtypes and shardings of `abstract_params` (ShapeDtypeStructs)."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).absolute() / PARAMS_DIR, abstract_params)


def abstract_like(params_shapes: dict, shardings: dict) -> dict:
    """Restore targets: each param's shape and dtype (float, or a quantized format's) on its sharding."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), params_shapes, shardings)
