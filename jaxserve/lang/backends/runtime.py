"""`Runtime`: an engine and its HTTP server in this process, for programs written against
SGLang's `sgl.Runtime(model_path=...)`."""

from __future__ import annotations

from jaxserve.lang.backends.http import RuntimeEndpoint


class Runtime:
    """`Runtime(model_path=None, **server_args)`: serves the model on a free port of
    127.0.0.1; `endpoint` is its `RuntimeEndpoint`, `url` its address."""

    def __init__(self, model_path: str | None = None, api_key: str | None = None, **server_args):
        from jaxserve.engine import Engine
        from jaxserve.server import ServerThread

        self.engine = Engine(model_path, api_key=api_key, **server_args)
        self.server = ServerThread(self.engine)
        self.url = self.server.url
        self.endpoint = RuntimeEndpoint(self.url, api_key=api_key)

    def shutdown(self) -> None:
        self.endpoint.close()
        self.server.stop()
        self.engine.shutdown()
