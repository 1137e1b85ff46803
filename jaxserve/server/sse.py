"""Server-sent events as SGLang's and OpenAI's clients read them, and client disconnects.

A stream is `data: {json}\\n\\n` events and then `data: [DONE]\\n\\n`, nothing else: SGLang's
benchmark client counts any other line (a comment, a ping) as an error.

Engine work is an async iterator (the engine's delta stream, formatted on the way);
closing it aborts what has not finished. So whatever ends a response early (a client
that goes away, streaming or not, or a server shutdown) only has to close that iterator
or cancel the task reading it; both unwind it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, TypeVar

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from jaxserve.server.protocol import APIError

__all__ = ["DONE", "event", "stream_response", "until_disconnect"]

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


def event(payload: Any) -> bytes:
    """One `data:` event."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def stream_response(request: Request, events: AsyncIterator[bytes]) -> Response:
    """An SSE response of `events`, then `[DONE]`.

    The first event is awaited before the headers go out, so a call the engine refuses
    when it starts (a rid in use, the engine down) is still an HTTP error status, not an
    in-band error after a 200."""
    try:
        first = await until_disconnect(request, anext(events))
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield first
                async for chunk in events:
                    yield chunk
        except Exception as exc:  # headers are out: report in-band, in the error shape
            logger.exception("stream failed")
            message = exc.message if isinstance(exc, APIError) else f"internal error: {exc}"
            yield event({"error": {"message": message, "type": "internal_server_error", "param": None,
                                   "code": 500}})
        finally:
            await events.aclose()
        yield DONE

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of tokens
    return _SSEResponse(body(), media_type="text/event-stream", headers=headers)


class _SSEResponse(StreamingResponse):
    """Closes its body however the response ends. Starlette cancels the sending task when
    the client disconnects but never closes the body iterator; one left suspended at a
    `yield` would keep its engine work running until garbage collection."""

    body_iterator: Any

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (which unwinds its engine
    stream and so aborts the engine work) and answer 499."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (server shutdown, a timeout around it)
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it unwind before answering
    if task.cancelled():
        raise APIError(499, "the client closed the connection")
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    # The body was read already, so the next ASGI message is the disconnect (or never comes).
    while (await request.receive())["type"] != "http.disconnect":
        pass
