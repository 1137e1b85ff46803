"""`python -m jaxserve convert`: a model source -> a converted orbax checkpoint directory."""

from __future__ import annotations

import logging
from pathlib import Path

from jaxserve.weights import checkpoint, quantization as quantization_plan

logger = logging.getLogger(__name__)


def convert(model_path: str | Path | None, output: str | Path, dtype: str = "bfloat16",
            quantization: str = "none") -> Path:
    """Load `model_path` (HF dir, GGUF or None for the bundled model) and write it to `output`,
    its weights in `dtype` or, where `quantization` says, quantized (weights/quantization.py)."""
    from jaxserve.weights import load

    model = load(model_path, dtype=dtype, quantization=quantization)
    output = Path(output)
    hf_config = model.config.to_hf()
    if model.quant:
        hf_config[quantization_plan.CONFIG_KEY] = quantization_plan.to_config(model.quant)
    checkpoint.save_params(output, model.param_tree, hf_config)
    model.tokenizer.save(output)
    logger.info("wrote %s (%s params, quantization %s, tokenizer, config)", output, dtype, quantization)
    return output
