"""Map HF-named tensors to the model's parameter tree (layers stacked on axis 0).

A tensor is a float array, or a `GGUFBlocks` (a GGUF tensor kept quantized). `quant`
(the model's plan, models/quant.py) says which weights are stored quantized: blocks of a
kept GGUF format are only transposed and stacked; float weights are quantized here.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from jaxserve.models import quant as q
from jaxserve.models.config import ModelConfig
from jaxserve.weights.gguf_file import GGUFBlocks

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


def hf_to_params(cfg: ModelConfig, tensors: dict, dtype, quant: dict | None = None) -> dict:
    """The pure-dict parameter tree of `LlamaForCausalLM` from HF tensors: float weights cast
    to `dtype`, the weights `quant` names in their `QuantFormat`."""
    quant = quant or {}

    def raw(name: str):
        if name not in tensors:
            raise KeyError(f"checkpoint is missing tensor {name!r}")
        return tensors[name]

    def get(name: str, transpose: bool = False, dtype=dtype) -> np.ndarray:
        w = raw(name)
        w = w.dequantize() if isinstance(w, GGUFBlocks) else np.asarray(w)
        return (w.T if transpose else w).astype(dtype)

    def linear(names: list[str], fmt) -> dict | np.ndarray:
        """A kernel [.., in, out] (stacked when `names` are the layers' copies of one weight)."""
        if fmt is None:
            return np.stack([get(n, transpose=True) for n in names])
        if fmt.group:  # a kept GGUF format: every copy is already in it
            parts = [raw(n).kernel_params() for n in names]
            return {k: np.stack([p[k] for p in parts]) for k in parts[0]}
        return q.quantize(np.stack([get(n, transpose=True, dtype=np.float32) for n in names]), fmt)

    params: dict = {}
    if "embed" in quant:
        params["embed"] = q.quantize_embedding(get("model.embed_tokens.weight", dtype=np.float32), quant["embed"])
    else:
        _set(params, ("embed", "embedding"), get("model.embed_tokens.weight"))
    _set(params, ("norm", "weight"), get("model.norm.weight"))
    if not cfg.tie_word_embeddings:
        head = linear(["lm_head.weight"], quant.get("lm_head"))
        params["lm_head"] = {k: v[0] for k, v in head.items()} if isinstance(head, dict) else {"kernel": head[0]}
    specs = _LAYER_PARAMS + (_BIAS_PARAMS if cfg.attention_bias else []) + (_QK_NORM_PARAMS if cfg.qk_norm else [])
    for path, hf_name, transpose in tqdm(specs, desc="loading weights", unit="weight"):
        names = [f"model.layers.{i}.{hf_name}" for i in range(cfg.num_layers)]
        if path[-1] == "kernel":
            value = linear(names, quant.get(path[-2]))
            if isinstance(value, dict):
                _set(params, ("layers", *path[:-1]), value)
                continue
        else:
            value = np.stack([get(n, transpose) for n in names])
        _set(params, ("layers", *path), value)
    return params
