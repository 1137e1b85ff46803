"""OpenAI-compatible routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

One straight path per request: parse the body (openai_protocol) -> `engine.prepare` ->
`engine.run` -> format (openai_format) as a JSON body or an SSE stream.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jaxserve.errors import InvalidRequestError
from jaxserve.server.openai_format import OpenAIFormatter
from jaxserve.server.openai_protocol import (CHAT, COMPLETION, OpenAIRequest, openai_message, parse_chat,
                                             parse_completion)
from jaxserve.server.protocol import APIError, accepts, json_response, read_json_object
from jaxserve.server.sse import stream_response, until_disconnect
from jaxserve.server.state import ServerState

__all__ = ["openai_routes"]

Parser = Callable[[dict, ServerState], Awaitable[OpenAIRequest]]


def openai_routes(state: ServerState) -> list[Route]:
    """The OpenAI routes bound to `state`."""
    started = int(time.time())

    async def models(request: Request) -> Response:
        """The served model, as OpenAI's model list."""
        card = {"id": state.model_name, "object": "model", "created": started, "owned_by": "jaxserve",
                "root": state.args.model_path or state.model_name, "max_model_len": state.engine.context_length}
        return json_response({"object": "list", "data": [card]})

    @accepts(COMPLETION)
    async def completions(request: Request) -> Response:
        """OpenAI text completions; JSON, or SSE with `stream`."""
        return await _serve(state, request, parse_completion)

    @accepts(CHAT)
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions through the model's chat template; JSON, or SSE with `stream`."""
        return await _serve(state, request, parse_chat)

    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]


async def _serve(state: ServerState, request: Request, parse: Parser) -> Response:
    start = time.monotonic()
    try:
        req = await parse(await read_json_object(request), state)
        gen = await state.engine.prepare(**req.prepare)
        formatter = OpenAIFormatter(req, gen, state.engine.tokenizer, int(time.time()))
        deltas = state.run(gen, start)
        if req.stream:
            return await stream_response(request, formatter.stream(deltas))
        return json_response(await until_disconnect(request, formatter.collect(deltas)))
    except InvalidRequestError as e:  # the engine names SGLang's fields; say OpenAI's
        raise APIError(400, openai_message(str(e))) from None
