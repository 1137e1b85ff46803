"""Device mesh (axes `data`, `model`) and partition specs for params and the KV pool.

Tensor parallelism follows Megatron: q/k/v and gate/up are split by output columns (whole
attention heads), o and down by input rows, the embedding and LM head by vocab (a
quantized weight's scales follow its output columns). A tensor
whose split axis is not divisible by `tp_size` is replicated instead, so any model runs
on any mesh (XLA inserts the collectives).
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.models.config import ModelConfig

logger = logging.getLogger(__name__)


def make_mesh(tp_size: int = 1, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if tp_size < 1 or len(devices) % tp_size:
        raise ValueError(f"--tp-size {tp_size} must divide the {len(devices)} available devices")
    return Mesh(np.array(devices).reshape(len(devices) // tp_size, tp_size)[:1], ("data", "model"))


def _split(size: int, tp: int, spec: P) -> P:
    return spec if size % tp == 0 else P()


def param_specs(cfg: ModelConfig, params: dict, tp: int) -> dict:
    """PartitionSpecs with the same tree structure as the model's pure-dict params."""
    q_cols = cfg.num_heads
    kv_cols = cfg.num_kv_heads
    rules = {
        ("embed", "embedding"): _split(cfg.vocab_size, tp, P("model", None)),
        ("embed", "scale"): _split(cfg.vocab_size, tp, P("model", None)),
        ("lm_head", "kernel"): _split(cfg.vocab_size, tp, P(None, "model")),
        ("attn", "q_proj", "kernel"): _split(q_cols, tp, P(None, None, "model")),
        ("attn", "q_proj", "bias"): _split(q_cols, tp, P(None, "model")),
        ("attn", "k_proj", "kernel"): _split(kv_cols, tp, P(None, None, "model")),
        ("attn", "k_proj", "bias"): _split(kv_cols, tp, P(None, "model")),
        ("attn", "v_proj", "kernel"): _split(kv_cols, tp, P(None, None, "model")),
        ("attn", "v_proj", "bias"): _split(kv_cols, tp, P(None, "model")),
        ("attn", "o_proj", "kernel"): _split(q_cols, tp, P(None, "model", None)),
        ("mlp", "gate_proj", "kernel"): _split(cfg.intermediate_size, tp, P(None, None, "model")),
        ("mlp", "up_proj", "kernel"): _split(cfg.intermediate_size, tp, P(None, None, "model")),
        ("mlp", "down_proj", "kernel"): _split(cfg.intermediate_size, tp, P(None, "model", None)),
    }

    # A quantized kernel's scale / offset [.., groups, out] split like its output columns.
    for key, value in list(rules.items()):
        if key[-1] == "kernel" and len(value) and value[-1] == "model":
            rules[(*key[:-1], "scale")] = rules[(*key[:-1], "offset")] = value

    def spec(path, _):
        keys = tuple(k.key for k in path)
        return rules.get(keys[1:] if keys[0] == "layers" else keys, P())

    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(cfg: ModelConfig, params: dict, mesh: Mesh) -> dict:
    tp = mesh.shape["model"]
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, params, tp))


def kv_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    """KV pool [layers, pages, page_size, kv_heads, head_dim], split on KV heads when possible."""
    tp = mesh.shape["model"]
    if cfg.num_kv_heads % tp:
        logger.info("tp_size %d does not divide %d KV heads: the KV pool is replicated", tp, cfg.num_kv_heads)
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(None, None, None, "model", None))
