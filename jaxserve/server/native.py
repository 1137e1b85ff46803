"""SGLang-native routes, with SGLang's request and response fields (see API_CONTRACT.md)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jaxserve import __version__
from jaxserve.server.generation import Generation, LogprobOptions, Prompt
from jaxserve.server.metrics import CONTENT_TYPE
from jaxserve.server.protocol import BOOL, INT, OBJECT, STR, APIError, Body, json_response, read_json_object
from jaxserve.server.sse import event
from jaxserve.server.state import ServerState

__all__ = ["native_routes"]

_GENERATE_FIELDS = ("text", "input_ids", "sampling_params", "rid", "stream", "return_logprob", "logprob_start_len",
                    "top_logprobs_num", "return_text_in_logprobs", "session_params")
# SGLang request fields for features we lack: accepted while null / false (clients send defaults).
_GENERATE_UNSUPPORTED = ("image_data", "audio_data", "video_data", "input_embeds", "lora_path", "modalities",
                         "custom_logit_processor", "return_hidden_states", "token_ids_logprob",
                         "bootstrap_host", "bootstrap_port", "bootstrap_room", "data_parallel_rank")
_GENERATE_IGNORED = ("log_metrics",)

_HEALTH_TIMEOUT_S = 60.0


def native_routes(state: ServerState) -> list[Route]:
    """The SGLang-native routes bound to `state`."""

    async def generate(request: Request) -> Response:
        body = Body(await read_json_object(request), _GENERATE_FIELDS, ignored=_GENERATE_IGNORED,
                    unsupported=_GENERATE_UNSUPPORTED, where="/generate request")
        id_lists, batched = _prompts(body, state.engine.tokenizer)
        prompts = [Prompt(ids, sp, rid) for ids, sp, rid in
                   zip(id_lists, _per_prompt(body, "sampling_params", OBJECT, len(id_lists), {}),
                       _rids(body, len(id_lists)))]
        options = LogprobOptions(
            return_logprob=body.get("return_logprob", BOOL, False),
            logprob_start_len=body.get("logprob_start_len", INT, -1),
            top_logprobs_num=body.get("top_logprobs_num", INT, 0),
            return_text_in_logprobs=body.get("return_text_in_logprobs", BOOL, False))
        generation = await state.begin(prompts, options, body.get("session_params", OBJECT))
        multi = batched or len(generation.branches) > 1
        if body.get("stream", BOOL, False):
            return state.stream(generation, _stream(generation, multi))
        results = await state.run(request, generation)
        return json_response(results if multi else results[0])

    async def get_model_info(request: Request) -> Response:
        path = state.args.model_path or state.model_name
        return json_response({"model_path": path, "tokenizer_path": path, "served_model_name": state.model_name,
                              "is_generation": True})

    async def get_server_info(request: Request) -> Response:
        return json_response({**await state.server_info(), "version": __version__})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def health_generate(request: Request) -> Response:
        # One real token through the whole engine: catches a wedged scheduler, not just a live loop.
        prompt = Prompt(state.engine.tokenizer.encode("ping") or [0], {"max_new_tokens": 1, "temperature": 0},
                        f"health-{uuid.uuid4().hex}")
        generation = await state.begin([prompt], LogprobOptions())
        start = time.monotonic()
        try:
            results = await asyncio.wait_for(state.run(request, generation), _HEALTH_TIMEOUT_S)
        except TimeoutError:
            state.end(generation)
            raise APIError(503, f"no token generated within {_HEALTH_TIMEOUT_S:.0f} s") from None
        if results[0]["meta_info"]["finish_reason"]["type"] == "abort":
            raise APIError(503, f"health check aborted: {results[0]['meta_info']['finish_reason'].get('message')}")
        return json_response({"status": "ok", "latency": time.monotonic() - start})

    async def flush_cache(request: Request) -> Response:
        await read_json_object(request, allow_empty=True)  # SGLang clients send {} or nothing
        if not await state.off_loop(state.engine.flush_cache):
            raise APIError(400, "cache not flushed: requests are running; retry when the server is idle")
        return json_response({"success": True, "message": "Cache flushed."})

    async def abort_request(request: Request) -> Response:
        body = Body(await read_json_object(request), ("rid", "abort_all"), where="/abort_request request")
        if body.get("abort_all", BOOL, False):
            return json_response({"success": True, "aborted": state.abort_all()})
        rid = body.get("rid", STR, required=True)
        return json_response({"success": True, "aborted": state.abort(rid)})

    async def open_session(request: Request) -> Response:
        body = Body(await read_json_object(request, allow_empty=True), ("capacity_of_str_len", "session_id"),
                    where="/open_session request")
        sid = state.engine.open_session(body.get("capacity_of_str_len", INT), body.get("session_id", STR))
        return json_response(sid)  # SGLang answers the bare id

    async def close_session(request: Request) -> Response:
        body = Body(await read_json_object(request), ("session_id",), where="/close_session request")
        sid = body.get("session_id", STR, required=True)
        await state.off_loop(lambda: state.engine.close_session(sid))
        return json_response({"success": True})

    async def get_token_usage(request: Request) -> Response:
        info = await state.server_info()
        page = info["page_size"]
        return json_response({
            "total_tokens": info["total_pages"] * page, "max_total_num_tokens": info["max_total_num_tokens"],
            "used_tokens": info["locked_pages"] * page, "cached_tokens": info["evictable_pages"] * page,
            "free_tokens": info["free_pages"] * page, "token_usage": info["locked_pages"] / max(info["total_pages"], 1),
            "num_running_reqs": info["num_running_reqs"], "num_waiting_reqs": info["num_waiting_reqs"],
            "cache_hit_rate": info["cache_hit_rate"]})

    async def metrics(request: Request) -> Response:
        return Response(await state.off_loop(state.metrics.render), media_type=CONTENT_TYPE)

    return [
        Route("/generate", generate, methods=["POST"]),
        Route("/get_model_info", get_model_info, methods=["GET"]),
        Route("/get_server_info", get_server_info, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/health_generate", health_generate, methods=["GET"]),
        Route("/flush_cache", flush_cache, methods=["POST", "GET"]),
        Route("/abort_request", abort_request, methods=["POST"]),
        Route("/open_session", open_session, methods=["POST"]),
        Route("/close_session", close_session, methods=["POST"]),
        Route("/get_token_usage", get_token_usage, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]


async def _stream(generation: Generation, multi: bool) -> AsyncIterator[bytes]:
    async for index, out in generation.events():
        yield event({**out, "index": index} if multi else out)


def _prompts(body: Body, tokenizer) -> tuple[list[list[int]], bool]:
    """The prompts as token ids, and whether the input was a batch."""
    text, ids = body.data.get("text"), body.data.get("input_ids")
    if (text is None) == (ids is None):
        raise APIError(400, "give exactly one of `text` and `input_ids`")
    if text is not None:
        if isinstance(text, str):
            return [tokenizer.encode(text)], False
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            return [tokenizer.encode(t) for t in text], True
        raise APIError(400, "`text` must be a string or a non-empty list of strings", param="text")
    if isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
        return ids, True
    if isinstance(ids, list) and not any(isinstance(x, list) for x in ids):
        return [ids], False  # the engine checks the ids themselves
    raise APIError(400, "`input_ids` must be a list of token ids or a non-empty list of such lists",
                   param="input_ids")


def _per_prompt(body: Body, name: str, kind, count: int, default) -> list:
    """A field that is one value for every prompt or a list with one per prompt."""
    value = body.data.get(name)
    values = value if isinstance(value, list) else [value] * count
    if len(values) != count:
        raise APIError(400, f"`{name}` has {len(values)} entries for {count} prompts", param=name)
    check, what = kind
    for v in values:
        if v is not None and not check(v):
            raise APIError(400, f"`{name}` must be {what} (or a list of them, one per prompt)", param=name)
    return [default if v is None else v for v in values]


def _rids(body: Body, count: int) -> list[str]:
    given = _per_prompt(body, "rid", STR, count, None)
    return [rid if rid is not None else uuid.uuid4().hex for rid in given]
