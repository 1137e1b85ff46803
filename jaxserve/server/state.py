"""ServerState: what every route shares (engine, args, metrics, in-flight generations)."""

from __future__ import annotations

import os
from typing import Any, AsyncIterator, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from jaxserve.config import ServerArgs
from jaxserve.errors import InvalidRequestError
from jaxserve.server.generation import Generation, LogprobOptions, Prompt
from jaxserve.server.metrics import ServerMetrics
from jaxserve.server.sse import sse_response, until_disconnect

__all__ = ["ServerState", "BUNDLED_MODEL_NAME"]

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"


class ServerState:
    def __init__(self, engine, args: ServerArgs):
        self.engine = engine
        self.args = args
        self.model_name = args.served_model_name or _default_name(args.model_path)
        self.metrics = ServerMetrics(engine.get_server_info)
        self.active: dict[str, Generation] = {}  # by user-visible rid

    def accepts_model(self, name: str) -> bool:
        """Whether an OpenAI `model` field names this server's model."""
        return name in (self.model_name, self.args.model_path)

    async def server_info(self) -> dict:
        """Engine state; the engine answers between scheduler steps, so wait in a worker thread."""
        return await run_in_threadpool(self.engine.get_server_info)

    async def begin(self, prompts: list[Prompt], options: LogprobOptions,
                    session_params: dict | None = None) -> Generation:
        """Validate and register a generation; nothing runs until its events are read."""
        rids = [p.rid for p in prompts]
        taken = sorted({r for r in rids if r in self.active or rids.count(r) > 1})
        if taken:
            raise InvalidRequestError(f"rid {taken[0]!r} is already in use; give each request a unique rid")
        generation = Generation(self.engine, self.metrics, prompts, options, session_params)
        await generation.start()
        for rid in rids:
            self.active[rid] = generation
        return generation

    def end(self, generation: Generation) -> None:
        """Abort what is left of a generation and forget it."""
        generation.close()
        for rid in generation.user_rids:
            if self.active.get(rid) is generation:
                del self.active[rid]

    def abort(self, rid: str) -> int:
        """Abort the generation a client named `rid` (or an engine request of that id)."""
        generation = self.active.get(rid)
        if generation is not None:
            generation.abort()
            return 1
        self.engine.abort(rid)
        return 0

    def abort_all(self) -> int:
        generations = set(self.active.values())
        for generation in generations:
            generation.abort()
        return len(generations)

    async def run(self, request: Request, generation: Generation) -> list[dict]:
        """Final outputs of a non-streaming generation; aborts it if the client disconnects."""
        try:
            return await until_disconnect(request, generation.results(), generation.close)
        finally:
            self.end(generation)

    def stream(self, generation: Generation, events: AsyncIterator[bytes]) -> Response:
        """An SSE response of `events` (rendered from `generation`); ends the generation however
        the stream ends."""
        return sse_response(events, lambda: self.end(generation))

    async def off_loop(self, fn: Callable[[], Any]) -> Any:
        """Run a blocking engine call (one that waits for the scheduler thread) in a worker thread."""
        return await run_in_threadpool(fn)


def _default_name(model_path: str | None) -> str:
    if model_path is None:
        return BUNDLED_MODEL_NAME
    name = os.path.basename(os.path.normpath(model_path))
    return name.removesuffix(".gguf") or model_path
