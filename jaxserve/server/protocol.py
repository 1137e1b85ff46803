"""The HTTP edge: reading JSON bodies, typed field access, and the one error shape.

Request bodies are read through `RequestModel`s, which `/openapi.json` also describes. Every
route answers errors as `{"error": {"message", "type", "param", "code"}}` (OpenAI's
shape; SGLang's clients only look at the status and `message`). A handler raises
`APIError`; the engine's `InvalidRequestError` becomes a 400 with the engine's message.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

__all__ = [
    "APIError", "Body", "BOOL", "accepts", "INT", "Kind", "NUMBER", "OBJECT", "RequestModel", "STR", "checked_later",
    "error_response", "int_range", "json_response", "nested", "read_json_object",
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Kind:
    """What one field holds: the check, how an error message names it, and its JSON Schema
    (what `/openapi.json` says). A kind whose `check` accepts anything documents a field the
    engine checks itself."""

    check: Callable[[Any], bool]
    what: str
    schema: dict = dataclasses.field(default_factory=dict)


STR = Kind(lambda v: isinstance(v, str), "a string", {"type": "string"})
INT = Kind(_is_int, "an integer", {"type": "integer"})
BOOL = Kind(lambda v: isinstance(v, bool), "a boolean", {"type": "boolean"})
NUMBER = Kind(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number",
              {"type": "number"})
OBJECT = Kind(lambda v: isinstance(v, dict), "an object", {"type": "object"})


def int_range(low: int, high: int) -> Kind:
    return Kind(lambda v: _is_int(v) and low <= v <= high, f"an integer between {low} and {high}",
                {"type": "integer", "minimum": low, "maximum": high})


def checked_later(schema: dict, description: str) -> Kind:
    """A field passed on as it is (the engine checks it and names it in its message)."""
    return Kind(lambda v: True, "any value", {**schema, "description": description})


@dataclasses.dataclass(frozen=True)
class RequestModel:
    """The JSON object a route accepts. Handlers read bodies through it (`parse`) and
    `/openapi.json` describes it (`json_schema`), so the two cannot drift apart.

    `ignored` fields are accepted and dropped (clients send them; they change nothing here);
    `unsupported` fields are accepted only when null, false or empty, so a client that sends
    its defaults works, and one that relies on a feature we lack is told so. `open` models
    take any field (routes that read nothing from the body); `empty_ok` ones take no body.
    """

    name: str
    where: str  # how messages name the body: "the /generate request"
    fields: dict[str, Kind] = dataclasses.field(default_factory=dict)
    required: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    unsupported: tuple[str, ...] = ()
    exactly_one: tuple[str, ...] = ()  # exactly one of these fields is given (and not null)
    open: bool = False
    empty_ok: bool = False  # an empty body reads as {}

    async def read(self, request: Request) -> "Body":
        """The request's body, read and checked against this model."""
        return self.parse(await read_json_object(request, allow_empty=self.empty_ok))

    def parse(self, data: dict[str, Any]) -> "Body":
        return Body(data, self)

    def json_schema(self) -> dict:
        props = {name: kind.schema for name, kind in self.fields.items()}
        props.update({name: {"description": "accepted and ignored"} for name in self.ignored})
        props.update({name: {"enum": [None, False, [], {}], "description": "not supported: only null, false or empty"}
                      for name in self.unsupported})
        schema = {"type": "object", "properties": props, "additionalProperties": self.open}
        if self.required:
            schema["required"] = list(self.required)
        if self.exactly_one:
            schema["oneOf"] = [{"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                               for name in self.exactly_one]
        return schema


def nested(model: RequestModel) -> Kind:
    """An object field that is itself a request model (checked with `model.parse`)."""
    return Kind(lambda v: isinstance(v, dict), "an object", model.json_schema())


def accepts(model: RequestModel) -> Callable:
    """Marks a route's endpoint with the model of its body (what `/openapi.json` shows)."""
    def mark(endpoint: Callable) -> Callable:
        endpoint.request_model = model
        return endpoint
    return mark


class Body:
    """A request object read through its `RequestModel`: unknown fields, unsupported features
    and missing required fields are refused up front; `get` checks each field's kind."""

    def __init__(self, data: dict[str, Any], model: RequestModel):
        self.data, self.model = data, model
        if model.open:
            return
        known = set(model.fields) | set(model.ignored)
        unknown = sorted(set(data) - known - set(model.unsupported))
        if unknown:
            raise APIError(400, f"unknown field(s) {unknown} in {model.where}; valid fields are: "
                                f"{', '.join(sorted(known))}", param=unknown[0])
        for name in sorted(set(model.unsupported) & set(data)):
            if data[name] not in (None, False, [], {}):
                raise APIError(400, f"`{name}` is not supported by this server", param=name)
        for name in model.required:
            if data.get(name) is None:
                raise APIError(400, f"`{name}` is required", param=name)
        if model.exactly_one and sum(data.get(name) is not None for name in model.exactly_one) != 1:
            raise APIError(400, f"give exactly one of {' and '.join(f'`{n}`' for n in model.exactly_one)}")

    def get(self, name: str, default: Any = None, *, required: bool = False) -> Any:
        """The field's value, `default` when absent or null; 400 when not of the field's kind."""
        kind = self.model.fields[name]
        value = self.data.get(name)
        if value is None:
            if required:
                raise APIError(400, f"`{name}` is required", param=name)
            return default
        if not kind.check(value):
            raise APIError(400, f"`{name}` must be {kind.what}, got {_describe(value)}", param=name)
        return value


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} (a JSON {_json_type(value)})"
