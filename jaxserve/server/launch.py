"""Running the app under uvicorn: from the CLI (blocking, SIGTERM-aware) or in a background thread.

Shutdown on SIGTERM / SIGINT: uvicorn stops accepting connections; in-flight requests get
`shutdown_timeout` seconds to finish, then the rest are aborted, so their streams still
end properly (a final `abort` event and `[DONE]`); the engine drains and stops, and the
process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time

import uvicorn

from jaxserve.config import ServerArgs
from jaxserve.errors import EngineUnavailableError
from jaxserve.server.app import create_app
from jaxserve.server.state import ServerState

__all__ = ["ServerThread", "serve"]

logger = logging.getLogger("jaxserve.server")


def serve(args: ServerArgs, *, shutdown_timeout: float = 30.0) -> None:
    """Load the model, warm up, serve until SIGTERM / SIGINT, shut down cleanly."""
    from jaxserve.engine import Engine

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("serving on %s without --api-key: anyone who can reach this address can use the "
                       "server (generate, flush its cache, abort requests)", args.host)
    engine = Engine(**vars(args))
    try:
        app = create_app(engine, args)
        server = _uvicorn_server(app, args.host, args.port, args.log_level, shutdown_timeout)
        # uvicorn re-raises the signal it caught once it has shut down; these handlers make that
        # a no-op, so the process goes on to stop the engine and exit 0 instead of dying by it.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        url = f"http://{_url_host(args.host)}:{args.port}"
        asyncio.run(_serve_until_shutdown(server, app.state.server, url, shutdown_timeout))
    finally:
        engine.shutdown()
    logger.info("jaxserve stopped")


async def _serve_until_shutdown(server: uvicorn.Server, state: ServerState, url: str, shutdown_timeout: float,
                                sockets: list[socket.socket] | None = None) -> None:
    """Serve, log the ready line, and on shutdown abort what outlasts `shutdown_timeout`."""
    task = asyncio.create_task(server.serve(sockets=sockets))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        engine = state.engine
        logger.info("jaxserve ready at %s (model %s, context %d)", url, state.model_name, engine.context_length)
    while not task.done() and not server.should_exit:
        await asyncio.wait({task}, timeout=0.1)
    if not task.done():
        await asyncio.wait({task}, timeout=shutdown_timeout)
        if not task.done():
            aborted = state.engine.abort_all()
            logger.info("shutdown: aborted %d in-flight requests after %.1f s", aborted, shutdown_timeout)
    await task
    await _drain(state.engine)


async def _drain(engine, timeout: float = 10.0) -> None:
    """Wait (with this loop alive) until the engine has delivered every output it still owes;
    the scheduler thread posts outputs to this loop and must not find it closed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = await asyncio.to_thread(engine.get_server_info)
        except EngineUnavailableError:  # it died: it ended every request as it went
            return
        if info["num_running_reqs"] == info["num_waiting_reqs"] == 0:
            return
        await asyncio.sleep(0.05)
    logger.warning("shutdown: the engine still has requests after %.0f s", timeout)


def _uvicorn_server(app, host: str, port: int, log_level: str, shutdown_timeout: float) -> uvicorn.Server:
    # uvicorn's own graceful timeout is only a backstop: we abort in-flight work before it fires,
    # so that streams end with a proper final event instead of being cut.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout + 10, lifespan="off")
    return uvicorn.Server(config)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class ServerThread:
    """The app for an existing engine, served from a background thread (tests, notebooks).

    `port=0` picks a free port; `url` is known once the constructor returns. The engine
    stays the caller's: `stop()` stops the HTTP server only.
    """

    def __init__(self, engine, args: ServerArgs | None = None, host: str = "127.0.0.1", port: int = 0,
                 shutdown_timeout: float = 5.0):
        self.app = create_app(engine, args)
        self.shutdown_timeout = shutdown_timeout
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.url = f"http://{host}:{self._socket.getsockname()[1]}"
        self.server = _uvicorn_server(self.app, host, port, "warning", shutdown_timeout)
        self._thread = threading.Thread(target=self._run, name="jaxserve-http", daemon=True)
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server thread died during start-up")
            self._thread.join(0.02)

    def _run(self) -> None:
        asyncio.run(_serve_until_shutdown(self.server, self.app.state.server, self.url, self.shutdown_timeout,
                                          sockets=[self._socket]))

    def stop(self) -> None:
        """Stop serving (in-flight requests get `shutdown_timeout` to finish) and join the thread."""
        self.server.should_exit = True
        self._thread.join(timeout=self.shutdown_timeout + 30)
