"""Llama-family models over a paged KV pool (loading lives in `jaxserve.weights`)."""

from jaxserve.models.batch import ForwardBatch
from jaxserve.models.config import ModelConfig, UnsupportedModelError
from jaxserve.models.registry import MODEL_REGISTRY, model_class

__all__ = ["ForwardBatch", "MODEL_REGISTRY", "ModelConfig", "UnsupportedModelError", "model_class"]
