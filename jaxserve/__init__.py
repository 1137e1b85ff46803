"""jaxserve: a pure-JAX LLM serving engine."""

__version__ = "0.1.0"
