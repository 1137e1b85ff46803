"""The in-process engine: validation, fan-out, sessions and SGLang-shaped responses."""

from jaxserve.engine.engine import Engine
from jaxserve.engine.inputs import GenerateInput, LogprobOptions

__all__ = ["Engine", "GenerateInput", "LogprobOptions"]
