"""The HTTP edge: reading JSON bodies, typed field access, and the one error shape.

Every route answers errors as `{"error": {"message", "type", "param", "code"}}` (OpenAI's
shape; SGLang's clients only look at the status and `message`). A handler raises
`APIError`; the engine's `InvalidRequestError` becomes a 400 with the engine's message.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

__all__ = [
    "APIError", "Body", "BOOL", "INT", "NUMBER", "OBJECT", "STR", "error_response", "json_response",
    "read_json_object",
]

MAX_BODY_BYTES = 64 << 20  # far above any prompt a context window holds; stops runaway uploads

_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
    500: "internal_server_error", 503: "service_unavailable",
}


class APIError(Exception):
    """An HTTP error with a message that says what to fix."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> Response:
        return error_response(self.status, self.message, param=self.param, code=self.code)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> Response:
    """The error body every route uses."""
    body = {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param, "code": code if code is not None else status}
    return json_response({"error": body}, status)


def json_response(data: Any, status: int = 200) -> Response:
    """JSON without ASCII escaping; a non-finite float (never expected) fails loudly as a 500."""
    return JSONResponse(data, status_code=status)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Request) -> bytes:
    """The raw body, refused with a 413 as soon as it passes the server's limit
    (`--max-request-body-bytes`): by its Content-Length, or while it streams in."""
    state = getattr(request.app.state, "server", None)
    limit = state.args.max_request_body_bytes if state is not None else MAX_BODY_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes; the limit is {limit} (--max-request-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes (--max-request-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request body as a JSON object; 4xx for empty, oversized, non-UTF-8 or non-JSON bodies."""
    body = await read_body(request)
    if not body.strip():
        if allow_empty:
            return {}
        raise APIError(400, "the request body is empty: send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (bad byte at offset {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)  # NaN / Infinity are not JSON
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got a JSON {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


# A field kind: (predicate, what the message calls it).
Kind = tuple[Callable[[Any], bool], str]
STR: Kind = (lambda v: isinstance(v, str), "a string")
INT: Kind = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
BOOL: Kind = (lambda v: isinstance(v, bool), "a boolean")
NUMBER: Kind = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number")
OBJECT: Kind = (lambda v: isinstance(v, dict), "an object")


class Body:
    """A request object with a fixed set of known fields; unknown fields are refused.

    `ignored` fields are accepted and dropped (clients send them; they change nothing here);
    `unsupported` fields are accepted only when null or false, so a client that sends its
    defaults works, and one that relies on a feature we lack is told so.
    """

    def __init__(self, data: dict[str, Any], known: Iterable[str], *, ignored: Iterable[str] = (),
                 unsupported: Iterable[str] = (), where: str = "request"):
        self.data = data
        known, ignored, unsupported = set(known), set(ignored), set(unsupported)
        unknown = sorted(set(data) - known - ignored - unsupported)
        if unknown:
            raise APIError(400, f"unknown field(s) {unknown} in the {where}; valid fields are: "
                                f"{', '.join(sorted(known | ignored))}", param=unknown[0])
        for name in sorted(unsupported & set(data)):
            if data[name] not in (None, False, [], {}):
                raise APIError(400, f"`{name}` is not supported by this server", param=name)

    def get(self, name: str, kind: Kind, default: Any = None, *, required: bool = False) -> Any:
        """The field's value, `default` when absent or null; 400 when of the wrong type."""
        value = self.data.get(name)
        if value is None:
            if required:
                raise APIError(400, f"`{name}` is required", param=name)
            return default
        check, what = kind
        if not check(value):
            raise APIError(400, f"`{name}` must be {what}, got {_describe(value)}", param=name)
        return value

    def get_int_range(self, name: str, low: int, high: int, default: Any = None) -> Any:
        """An integer field that must lie in [low, high]."""
        value = self.get(name, INT, default)
        if value is not None and not low <= value <= high:
            raise APIError(400, f"`{name}` must be between {low} and {high}, got {value}", param=name)
        return value


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} (a JSON {_json_type(value)})"
