"""`/openapi.json`: an OpenAPI 3.1 description of every route, built from the app's own route
table and the `RequestModel`s the handlers parse their bodies with, so it cannot drift from
what the server accepts."""

from __future__ import annotations

import inspect

from starlette.routing import Route

from jaxserve import __version__
from jaxserve.server.protocol import RequestModel

__all__ = ["openapi_document"]

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["integer", "string"]}}}}}
_ERROR_REF = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_ERRORS = {"400": "the request is invalid: the message says what to fix", "401": "missing or wrong API key",
           "413": "the body is over --max-request-body-bytes", "503": "overloaded (Retry-After) or not alive"}


_DESCRIPTION = ("SGLang's native API and the OpenAI API. In every request body a field that is null is the same "
                "as one left out (its default). Errors have one shape: `Error`.")


def openapi_document(routes: list[Route], *, title: str, api_key: bool) -> dict:
    """The description of `routes` (Starlette routes whose endpoints may carry `request_model`)."""
    schemas: dict[str, dict] = {"Error": _ERROR}
    paths: dict[str, dict] = {}
    for route in routes:
        model: RequestModel | None = getattr(route.endpoint, "request_model", None)
        summary = (inspect.getdoc(route.endpoint) or route.name).split("\n\n")[0].replace("\n", " ")
        for method in sorted((route.methods or set()) - {"HEAD"}):
            operation = {"operationId": f"{method.lower()}_{route.path.strip('/').replace('/', '_') or 'root'}",
                         "summary": summary, "responses": _responses(route.path)}
            if model is not None and method == "POST":
                schemas[model.name] = model.json_schema()
                operation["requestBody"] = {"required": not model.empty_ok, "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{model.name}"}}}}
            paths.setdefault(route.path, {})[method.lower()] = operation
    document = {"openapi": "3.1.0", "info": {"title": title, "version": __version__, "description": _DESCRIPTION}, "paths": paths,
                "components": {"schemas": schemas}}
    if api_key:  # every route but /health needs it
        document["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"apiKey": []}]
        paths["/health"]["get"]["security"] = []
    return document


def _responses(path: str) -> dict:
    ok = {"description": "success", "content": {"application/json": {}}}
    if path == "/metrics":
        ok = {"description": "Prometheus text format", "content": {"text/plain": {}}}
    elif path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        ok["content"]["text/event-stream"] = {}
    return {"200": ok, **{status: {"description": text, **_ERROR_REF} for status, text in _ERRORS.items()}}

