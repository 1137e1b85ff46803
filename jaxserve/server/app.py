"""The Starlette app: routes, API-key check, and the mapping of every failure to a JSON error
(`InvalidRequestError` -> 400, `EngineUnavailableError` -> 503, `EngineOverloadedError` -> 503 with
`Retry-After`, anything else -> 500)."""

from __future__ import annotations

import hmac
import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from jaxserve.config import ServerArgs
from jaxserve.errors import EngineOverloadedError, EngineUnavailableError, InvalidRequestError
from jaxserve.server.native import native_routes
from jaxserve.server.openai_api import openai_routes
from jaxserve.server.openapi import openapi_document
from jaxserve.server.protocol import APIError, error_response, json_response
from jaxserve.server.state import ServerState

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_GENERATION_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
_OPEN_PATHS = ("/health",)  # reachable without the API key (liveness probes)


def create_app(engine, args: ServerArgs | None = None) -> Starlette:
    """An ASGI app serving `engine`. The caller owns the engine (starts and shuts it down)."""
    args = args or engine.args
    state = ServerState(engine, args)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        _count_invalid(state, request, exc.status)
        return exc.response()

    async def invalid_request(request: Request, exc: Exception) -> Response:
        _count_invalid(state, request, 400)
        return error_response(400, str(exc))

    async def engine_unavailable(request: Request, exc: Exception) -> Response:
        if request.url.path in _GENERATION_PATHS:
            state.metrics.requests.labels("error").inc()
        return error_response(503, str(exc))

    async def engine_overloaded(request: Request, exc: Exception) -> Response:
        if request.url.path in _GENERATION_PATHS:
            state.metrics.requests.labels("overloaded").inc()
        response = error_response(503, str(exc), code="overloaded")
        response.headers["Retry-After"] = str(EngineOverloadedError.retry_after_s)
        return response

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(exc.status_code, message.get(exc.status_code, str(exc.detail)))

    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("request to %s failed", request.url.path)
        if request.url.path in _GENERATION_PATHS:
            state.metrics.requests.labels("error").inc()
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    routes = native_routes(state) + openai_routes(state)

    async def openapi(request: Request) -> Response:
        """This description."""
        return json_response(document)

    routes.append(Route("/openapi.json", openapi, methods=["GET"]))
    document = openapi_document(routes, title=f"jaxserve ({state.model_name})", api_key=bool(args.api_key))
    app = Starlette(
        routes=routes,
        exception_handlers={APIError: api_error, InvalidRequestError: invalid_request,
                            EngineUnavailableError: engine_unavailable, EngineOverloadedError: engine_overloaded,
                            HTTPException: http_error,
                            Exception: internal_error},
    )
    app.state.server = state
    if args.api_key:
        app.add_middleware(_ApiKey, api_key=args.api_key)
    return app


def _count_invalid(state: ServerState, request: Request, status: int) -> None:
    if request.url.path in _GENERATION_PATHS and status < 500 and status != 499:
        state.metrics.requests.labels("invalid").inc()


class _ApiKey:
    """Every route but `/health` needs `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no key guessing by timing
                message = "missing or wrong API key: send `Authorization: Bearer <key>`"
                await error_response(401, message, code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)
