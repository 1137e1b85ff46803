"""HTTP server: SGLang-native and OpenAI-compatible routes on Starlette, served by uvicorn."""

from jaxserve.server.app import create_app
from jaxserve.server.launch import ServerThread, serve

__all__ = ["ServerThread", "create_app", "serve"]
