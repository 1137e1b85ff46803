"""Running the app under uvicorn: from the CLI (blocking, SIGTERM-aware) or in a background thread.

Shutdown on SIGTERM / SIGINT: uvicorn stops accepting connections, lets in-flight
responses finish for up to `shutdown_timeout` seconds, then cancels them (which aborts
their engine requests); then the engine stops and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading

import uvicorn

from jaxserve.config import ServerArgs
from jaxserve.server.app import create_app

__all__ = ["ServerThread", "serve"]

logger = logging.getLogger("jaxserve.server")


def serve(args: ServerArgs, *, shutdown_timeout: float = 30.0) -> None:
    """Load the model, warm up, serve until SIGTERM / SIGINT, shut down cleanly."""
    from jaxserve.engine import Engine

    engine = Engine(**vars(args))
    try:
        server = _uvicorn_server(create_app(engine, args), args.host, args.port, args.log_level, shutdown_timeout)
        # uvicorn re-raises the signal it caught once it has shut down; these handlers make that
        # a no-op, so the process goes on to stop the engine and exit 0 instead of dying by it.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        asyncio.run(_serve_and_announce(server, f"http://{_url_host(args.host)}:{args.port}", engine))
    finally:
        engine.shutdown()
    logger.info("jaxserve stopped")


async def _serve_and_announce(server: uvicorn.Server, url: str, engine, sockets=None) -> None:
    task = asyncio.create_task(server.serve(sockets=sockets))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        logger.info("jaxserve ready at %s (model %s, context %d)", url, engine.args.model_path or "bundled SmolLM2",
                    engine.context_length)
    await task


def _uvicorn_server(app, host: str, port: int, log_level: str, shutdown_timeout: float) -> uvicorn.Server:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="off")
    return uvicorn.Server(config)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class ServerThread:
    """The app for an existing engine, served from a background thread (tests, notebooks).

    `port=0` picks a free port; `url` is known once the constructor returns. The engine
    stays the caller's: `stop()` stops the HTTP server only.
    """

    def __init__(self, engine, args: ServerArgs | None = None, host: str = "127.0.0.1", port: int = 0):
        self.app = create_app(engine, args)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.url = f"http://{host}:{self._socket.getsockname()[1]}"
        self.server = _uvicorn_server(self.app, host, port, "warning", shutdown_timeout=5.0)
        self._thread = threading.Thread(target=self._run, args=(engine,), name="jaxserve-http", daemon=True)
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server thread died during start-up")
            self._thread.join(0.02)

    def _run(self, engine) -> None:
        asyncio.run(_serve_and_announce(self.server, self.url, engine, sockets=[self._socket]))

    def stop(self) -> None:
        """Stop serving (in-flight responses get `shutdown_timeout` to finish) and join the thread."""
        self.server.should_exit = True
        self._thread.join(timeout=30)
