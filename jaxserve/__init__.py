"""jaxserve: a pure-JAX LLM serving engine."""

__version__ = "0.1.0"


def __getattr__(name):
    # `Engine` pulls in JAX and the model code; import it only when asked for.
    if name == "Engine":
        from jaxserve.engine import Engine

        return Engine
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
