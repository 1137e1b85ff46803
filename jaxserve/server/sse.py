"""Server-sent events as SGLang's and OpenAI's clients read them, and disconnect handling.

A stream is `data: {json}\\n\\n` events and then `data: [DONE]\\n\\n`, nothing else: SGLang's
benchmark client counts any other line (a comment, a ping) as an error.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from jaxserve.server.protocol import APIError

__all__ = ["DONE", "event", "sse_response", "until_disconnect"]

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


def event(payload: Any) -> bytes:
    """One `data:` event."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_response(events: AsyncIterator[bytes], on_close: Callable[[], None]) -> StreamingResponse:
    """Stream `events`, then `[DONE]`. `on_close` (idempotent) runs however the stream ends, also
    when the client disconnects (Starlette then cancels the body), so the engine work is aborted."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in events:
                yield chunk
        except Exception as exc:  # headers are out: report in-band, in the error shape
            logger.exception("stream failed")
            message = exc.message if isinstance(exc, APIError) else f"internal error: {exc}"
            yield event({"error": {"message": message, "type": "internal_server_error", "param": None,
                                   "code": 500}})
        finally:
            on_close()
        yield DONE

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of tokens
    return _SSEResponse(body(), on_close, media_type="text/event-stream", headers=headers)


class _SSEResponse(StreamingResponse):
    """Also runs `on_close` when the body never started (client gone before the first byte)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def until_disconnect(request: Request, work: Awaitable[T], on_disconnect: Callable[[], None]) -> T:
    """Await `work` for a non-streaming response; if the client disconnects first, cancel it
    and call `on_disconnect` (abort its engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (server shutdown)
        watcher.cancel()
        if not task.done():
            task.cancel()
            on_disconnect()
    if task.cancelled():
        raise APIError(499, "the client closed the connection")
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    # The body was read already, so the next ASGI message is the disconnect (or never comes).
    while (await request.receive())["type"] != "http.disconnect":
        pass
