"""Where programs send their requests: the in-process engine, or a server over HTTP."""

from jaxserve.lang.backends.base import Backend, BackendError
from jaxserve.lang.backends.engine import EngineBackend
from jaxserve.lang.backends.http import RuntimeEndpoint
from jaxserve.lang.backends.openai import OpenAI
from jaxserve.lang.backends.runtime import Runtime

__all__ = ["Backend", "BackendError", "EngineBackend", "OpenAI", "Runtime", "RuntimeEndpoint"]
