"""The server against its own `/openapi.json`: schemathesis draws bodies from the request
models the handlers parse with, both valid ones and ones the schema forbids, and sends them
to a real server. No body may crash a handler (a 5xx) or leak pages; every refusal is a 4xx
in the one error shape, and a body the schema forbids is refused."""

from __future__ import annotations

import json
import os

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.core import NotSet

from tests.server_harness import assert_idle_accounting, http, server  # noqa: F401 (fixtures)

API_KEY = "fuzz-key"  # the harness's `server` and `http` fixtures use it
CAPS = {"max_new_tokens": 4, "max_tokens": 4, "max_completion_tokens": 4, "n": 3, "best_of": 3}
# The suite draws the same bodies every run; JAXSERVE_FUZZ_EXAMPLES=200 JAXSERVE_FUZZ_RANDOM=1 explores.
EXAMPLES = int(os.environ.get("JAXSERVE_FUZZ_EXAMPLES", "8"))
DERANDOMIZE = not os.environ.get("JAXSERVE_FUZZ_RANDOM")
SKIP = {"/start_profile", "/stop_profile"}  # a profiler trace per example: covered by the native tests


@pytest.fixture(scope="module")
def document(server, http):
    assert httpx.get(server.url + "/openapi.json").status_code == 401
    r = http.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def test_the_document_describes_every_route(server, document):
    routes = {route.path for route in server.app.routes}
    assert set(document["paths"]) == routes
    jsonschema.Draft202012Validator.check_schema({"$defs": document["components"]["schemas"]})
    schemas = document["components"]["schemas"]
    for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/abort_request"):
        ref = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.split("/")[-1] in schemas
    assert document["paths"]["/health"]["get"]["security"] == []
    assert document["security"] == [{"apiKey": []}]


def _cap(value):
    """Bodies drawn from the schema may ask for a million tokens; keep each one cheap."""
    if isinstance(value, list):
        return [_cap(v) for v in value[:4]]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, v in value.items():
        if key in CAPS and isinstance(v, int) and not isinstance(v, bool) and v > CAPS[key]:
            v = CAPS[key]
        out[key] = _cap(v)
    if isinstance(out.get("model"), str):  # any other name is a 404 before anything else is read
        out["model"] = "tiny"
    return out


def _forbidden(document: dict, operation, body) -> bool:
    """Whether the schema refuses `body` (negative cases may mutate only a header)."""
    if isinstance(body, bytes):
        return True
    ref = document["paths"][operation.path][operation.method.lower()]["requestBody"]["content"]
    schema = document["components"]["schemas"][ref["application/json"]["schema"]["$ref"].split("/")[-1]]
    return not jsonschema.Draft202012Validator(schema).is_valid(_without_nulls(body))


def _without_nulls(value):
    """The body as the server reads it: a null field is an absent one (the document says so)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return [_without_nulls(v) for v in value] if isinstance(value, list) else value


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_body_crashes_a_handler_or_leaks_pages(http, document, mode):
    schema = schemathesis.openapi.from_dict(document)
    error_schema = document["components"]["schemas"]["Error"]
    failures: list[str] = []
    answered: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        if operation.path in SKIP or (mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET"):
            continue

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def send(case):
            has_body = not isinstance(case.body, NotSet)
            body = _cap(case.body) if has_body else None
            kwargs = {}
            if isinstance(body, bytes):  # a body that is not JSON at all
                kwargs = {"content": body, "headers": {"content-type": case.media_type or "text/plain"}}
            elif has_body:
                kwargs = {"content": json.dumps(body), "headers": {"content-type": "application/json"}}
            r = http.request(case.method, case.path, **kwargs)
            answered.setdefault(case.path, set()).add(r.status_code)
            where = f"{case.method} {case.path} {kwargs.get('content')!r:.200}: {r.status_code} {r.text[:200]}"
            if r.status_code >= 500 and r.status_code != 503:
                failures.append("server error: " + where)
            elif r.status_code >= 400:
                try:
                    jsonschema.validate(r.json(), error_schema)
                except (ValueError, jsonschema.ValidationError):
                    failures.append("error shape: " + where)
            elif mode is GenerationMode.NEGATIVE and has_body and _forbidden(document, operation, body):
                failures.append("accepted a body the schema forbids: " + where)

        send()
    assert not failures, "\n".join(sorted(set(failures))[:20])
    if mode is GenerationMode.POSITIVE:  # drawn bodies get through to the engine, not only to refusals
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            assert 200 in answered[path], (path, answered[path])
    assert http.get("/health").status_code == 200
    assert_idle_accounting(http)
