"""Tiny random HF checkpoints of each supported family, and transformers reference logits."""

from __future__ import annotations

import numpy as np

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.1, rms_norm_eps=1e-5)

FAMILIES = {
    "llama3": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0})),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, num_key_value_heads=4, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(sliding_window=12, num_attention_heads=8, head_dim=8)),
}


def save_tiny_model(family: str, path, seed: int = 0, max_shard_size: str | None = None, **overrides) -> None:
    """save_pretrained a randomly initialised tiny model of `family` (safetensors) to `path`."""
    import torch
    import transformers

    config_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases, so loading mistakes show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": max_shard_size} if max_shard_size else {}))


def hf_logits(path, input_ids) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([list(input_ids)])).logits[0].numpy()


def assert_logits_close(ours, ref, rel: float) -> None:
    err = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
    assert err < rel, f"max |ours - ref| / max |ref| = {err:.2e} >= {rel:.0e}"
