"""`python -m jaxserve convert`: a model source -> a converted orbax checkpoint directory."""

from __future__ import annotations

import logging
from pathlib import Path

from jaxserve.weights import checkpoint

logger = logging.getLogger(__name__)


def convert(model_path: str | Path | None, output: str | Path, dtype: str = "bfloat16") -> Path:
    """Load `model_path` (HF dir, GGUF or None for the bundled model) and write it to `output`."""
    from jaxserve.weights import load

    model = load(model_path, dtype=dtype)
    output = Path(output)
    checkpoint.save_params(output, model.param_tree, model.config.to_hf())
    model.tokenizer.save(output)
    logger.info("wrote %s (%s params, tokenizer, config)", output, dtype)
    return output
