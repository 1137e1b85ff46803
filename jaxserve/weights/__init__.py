"""Model loading: checkpoint readers (HF, GGUF, orbax) and `load()` to put a model on a mesh."""

from jaxserve.weights.loader import LoadedModel, load

__all__ = ["LoadedModel", "load"]
