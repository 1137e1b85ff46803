"""Map HF-named tensors to the model's parameter tree (layers stacked on axis 0)."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from jaxserve.models.config import ModelConfig

# (our path inside `layers`, HF name inside `model.layers.{i}`, transpose to [in, out])
_LAYER_PARAMS = [
    (("input_norm", "weight"), "input_layernorm.weight", False),
    (("post_norm", "weight"), "post_attention_layernorm.weight", False),
    *[((("attn", f"{p}_proj", "kernel")), f"self_attn.{p}_proj.weight", True) for p in "qkvo"],
    *[((("mlp", f"{p}_proj", "kernel")), f"mlp.{p}_proj.weight", True) for p in ("gate", "up", "down")],
]
_BIAS_PARAMS = [(("attn", f"{p}_proj", "bias"), f"self_attn.{p}_proj.bias", False) for p in "qkv"]
_QK_NORM_PARAMS = [(("attn", f"{p}_norm", "weight"), f"self_attn.{p}_norm.weight", False) for p in "qk"]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def hf_to_params(cfg: ModelConfig, tensors: dict[str, np.ndarray], dtype) -> dict:
    """The pure-dict parameter tree of `LlamaForCausalLM` from HF tensors, cast to `dtype`."""

    def get(name: str, transpose: bool = False) -> np.ndarray:
        if name not in tensors:
            raise KeyError(f"checkpoint is missing tensor {name!r}")
        w = np.asarray(tensors[name])
        return (w.T if transpose else w).astype(dtype)

    params: dict = {}
    _set(params, ("embed", "embedding"), get("model.embed_tokens.weight"))
    _set(params, ("norm", "weight"), get("model.norm.weight"))
    if not cfg.tie_word_embeddings:
        _set(params, ("lm_head", "kernel"), get("lm_head.weight", transpose=True))
    specs = _LAYER_PARAMS + (_BIAS_PARAMS if cfg.attention_bias else []) + (_QK_NORM_PARAMS if cfg.qk_norm else [])
    for path, hf_name, transpose in tqdm(specs, desc="loading weights", unit="weight"):
        stacked = np.stack([get(f"model.layers.{i}.{hf_name}", transpose) for i in range(cfg.num_layers)])
        _set(params, ("layers", *path), stacked)
    return params
