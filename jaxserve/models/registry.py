"""Registry: HF `architectures` name -> model class."""

from __future__ import annotations

from jaxserve.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from jaxserve.models.llama import LlamaForCausalLM

# Llama 2/3, Mistral, Qwen2, Qwen3 and SmolLM differ only in options of one decoder.
MODEL_REGISTRY = {name: LlamaForCausalLM for name in SUPPORTED_ARCHITECTURES}


def model_class(cfg: ModelConfig):
    if cfg.architecture not in MODEL_REGISTRY:
        raise UnsupportedModelError(
            f"unsupported architecture {cfg.architecture!r}; supported: {', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[cfg.architecture]
