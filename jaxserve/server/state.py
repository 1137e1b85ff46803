"""ServerState: what every route shares: the engine, the server's args, its model name and
its metrics, and the engine stream with those metrics observed on the way."""

from __future__ import annotations

import os
from typing import AsyncIterator

from jaxserve.config import ServerArgs
from jaxserve.engine.inputs import GenerateInput
from jaxserve.scheduler import RequestOutput
from jaxserve.server.metrics import ServerMetrics

__all__ = ["ServerState", "BUNDLED_MODEL_NAME"]

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"


class ServerState:
    def __init__(self, engine, args: ServerArgs):
        self.engine = engine
        self.args = args
        self.model_name = args.served_model_name or _default_name(args.model_path)
        self.metrics = ServerMetrics(engine.get_server_info)

    def accepts_model(self, name: str) -> bool:
        """Whether an OpenAI `model` field names this server's model."""
        return name in (self.model_name, self.args.model_path)

    def run(self, gen: GenerateInput, start: float) -> AsyncIterator[tuple[int, RequestOutput]]:
        """`engine.run(gen)` for a request that arrived at `start`, observed by the metrics.
        Closing it (or cancelling its reader) aborts what has not finished."""
        return self.metrics.tracked(self.engine.run(gen), gen.num_branches, start)


def _default_name(model_path: str | None) -> str:
    if model_path is None:
        return BUNDLED_MODEL_NAME
    name = os.path.basename(os.path.normpath(model_path))
    return name.removesuffix(".gguf") or model_path
