"""Llama-family models over a paged KV pool, and `load()` to put one on a mesh."""

from jaxserve.models.batch import ForwardBatch
from jaxserve.models.config import ModelConfig, UnsupportedModelError
from jaxserve.models.loaded import LoadedModel, load
from jaxserve.models.registry import MODEL_REGISTRY, model_class

__all__ = ["ForwardBatch", "LoadedModel", "MODEL_REGISTRY", "ModelConfig", "UnsupportedModelError", "load", "model_class"]
