"""SGLang-native routes, with SGLang's request and response fields (see the README's Serving
section). `/generate` is one straight path: parse the body -> `engine.prepare` (which
validates and tokenizes) -> `engine.run` -> the engine's `ResponseBuilder`s -> JSON or SSE.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jaxserve import __version__
from jaxserve.engine.responses import ResponseBuilder
from jaxserve.server.metrics import CONTENT_TYPE
from jaxserve.sampling.params import SamplingParams
from jaxserve.server.protocol import (BOOL, INT, STR, APIError, Kind, RequestModel, accepts, checked_later,
                                      json_response)
from jaxserve.server.sse import event, stream_response, until_disconnect
from jaxserve.server.state import ServerState

__all__ = ["native_routes"]

_STRINGS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_PROMPTS = {"oneOf": [{"type": "string", "minLength": 1},
                      {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}]}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_SAMPLING = SamplingParams.schema()
GENERATE = RequestModel("GenerateRequest", "the /generate request", {
    "text": checked_later(_PROMPTS, "the prompt, or a batch of prompts"),
    "input_ids": checked_later({"oneOf": [_IDS, {"type": "array", "items": _IDS, "minItems": 1}]},
                               "token ids (below the vocabulary size) instead of text"),
    "sampling_params": checked_later({"oneOf": [_SAMPLING, {"type": "array", "items": _SAMPLING}]},
                                     "one object, or one per prompt"),
    "rid": checked_later(_STRINGS, "the request id (one per prompt for a batch)"),
    "stream": BOOL, "return_logprob": BOOL, "logprob_start_len": INT, "top_logprobs_num": INT,
    "return_text_in_logprobs": BOOL,
    "session_params": checked_later({"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]},
                                    "continue an open session"),
}, exactly_one=("text", "input_ids"), ignored=("log_metrics", "model", "no_logs"),  # `model`: the router's
    # SGLang request fields for features we lack: accepted while null / false (clients send defaults).
    unsupported=("image_data", "audio_data", "video_data", "input_embeds", "lora_path", "modalities",
                 "custom_logit_processor", "return_hidden_states", "token_ids_logprob", "bootstrap_host",
                 "bootstrap_port", "bootstrap_room", "data_parallel_rank", "background", "return_bytes",
                 "return_entropy"))
# SGLang clients send {}, nothing, or options
ANY_OBJECT = RequestModel("AnyObject", "the request", open=True, empty_ok=True)
ABORT = RequestModel("AbortRequest", "the /abort_request request", {"rid": STR, "abort_all": BOOL})
OPEN_SESSION = RequestModel("OpenSessionRequest", "the /open_session request",
                            {"capacity_of_str_len": INT, "session_id": STR}, empty_ok=True)
CLOSE_SESSION = RequestModel("CloseSessionRequest", "the /close_session request", {"session_id": STR},
                             required=("session_id",))
CONCATE = RequestModel("ConcateAndAppendRequest", "the /concate_and_append_request request", {
    "src_rids": checked_later({"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                              "the forked requests"),
    "dst_rid": Kind(lambda v: isinstance(v, str) and v != "", "a non-empty string", {"type": "string", "minLength": 1}),
}, required=("src_rids", "dst_rid"))
# SGLang's client sends no body; SGLang's server also takes these. A client never picks a path.
START_PROFILE = RequestModel("StartProfileRequest", "the /start_profile request", ignored=("activities",),
                             unsupported=("output_dir", "num_steps", "profile_by_stage", "with_stack",
                                          "record_shapes", "profile_id", "merge_profiles"), empty_ok=True)

_HEALTH_TIMEOUT_S = 60.0


def native_routes(state: ServerState) -> list[Route]:
    """The SGLang-native routes bound to `state`."""
    engine = state.engine

    @accepts(GENERATE)
    async def generate(request: Request) -> Response:
        """Generate from text or token ids (SGLang's native API); JSON, or SSE with `stream`."""
        start = time.monotonic()
        body = await GENERATE.read(request)
        stream = body.get("stream", False)
        gen = await engine.prepare(
            prompt=body.get("text"), input_ids=body.get("input_ids"), sampling_params=body.get("sampling_params"),
            return_logprob=body.get("return_logprob", False), logprob_start_len=body.get("logprob_start_len", -1),
            top_logprobs_num=body.get("top_logprobs_num", 0),
            return_text_in_logprobs=body.get("return_text_in_logprobs", False),
            rid=body.get("rid"), session_params=body.get("session_params"))
        builders = engine.builders(gen)
        multi = gen.batched or len(builders) > 1  # the answer is a list, and stream chunks carry "index"
        deltas = state.run(gen, start)
        if stream:
            return await stream_response(request, _chunks(deltas, builders, multi))
        results = await until_disconnect(request, _finals(deltas, builders))
        return json_response(results if multi else results[0])

    async def get_model_info(request: Request) -> Response:
        """The model's path, name, chat template and special tokens."""
        path = state.args.model_path or state.model_name
        tokenizer = engine.tokenizer  # the frontend language renders role prefixes with these
        return json_response({"model_path": path, "tokenizer_path": path, "served_model_name": state.model_name,
                              "is_generation": True, "chat_template": tokenizer.chat_template or None,
                              "bos_token": tokenizer.bos_token or None, "eos_token": tokenizer.eos_token or None})

    async def get_server_info(request: Request) -> Response:
        """The server's arguments, pool sizes, page accounting and counters."""
        info = await asyncio.to_thread(engine.get_server_info)
        # Routers name the model from these (the bundled model has no path of its own).
        info.update(model_path=state.args.model_path or state.model_name, served_model_name=state.model_name)
        return json_response({**info, "version": __version__})

    async def get_load(request: Request) -> Response:
        """SGLang's load report (what routers poll): one entry per data-parallel rank, with
        the requests running and waiting and the tokens their KV pages hold."""
        info = await asyncio.to_thread(engine.get_server_info)
        held = info["locked_pages"] + info["private_pages"]
        return json_response([{"dp_rank": 0, "num_reqs": info["num_running_reqs"] + info["num_waiting_reqs"],
                               "num_waiting_reqs": info["num_waiting_reqs"], "num_tokens": held * info["page_size"]}])

    async def health(request: Request) -> Response:
        """200 with radix-cache stats while the scheduler lives, else 503 (needs no API key)."""
        if engine.healthy:  # cheap: counters read without waiting for the scheduler thread
            return json_response({"status": "ok", "radix_cache": engine.cache_summary()})
        return json_response({"status": "unhealthy", "reason": engine.unavailable_reason}, 503)

    async def health_generate(request: Request) -> Response:
        """Generates one token through the whole engine; 503 when it cannot."""
        # One real token through the whole engine: catches a wedged scheduler, not just a live loop.
        # Not observed by the metrics: launchers poll this every few seconds.
        if not engine.healthy:
            raise APIError(503, f"unhealthy: {engine.unavailable_reason}")
        gen = await engine.prepare(prompt="ping", sampling_params={"max_new_tokens": 1, "temperature": 0},
                                   rid=f"health-{uuid.uuid4().hex}")
        start = time.monotonic()
        try:
            results = await asyncio.wait_for(until_disconnect(request, _finals(engine.run(gen), engine.builders(gen))),
                                             _HEALTH_TIMEOUT_S)
        except TimeoutError:
            raise APIError(503, f"no token generated within {_HEALTH_TIMEOUT_S:.0f} s") from None
        reason = results[0]["meta_info"]["finish_reason"]
        if reason["type"] == "abort":
            raise APIError(503, f"health check aborted: {reason.get('message')}")
        return json_response({"status": "ok", "latency": time.monotonic() - start})

    @accepts(ANY_OBJECT)
    async def flush_cache(request: Request) -> Response:
        """Empties the radix cache (every tier); 400 while requests run."""
        await ANY_OBJECT.read(request)
        if not await asyncio.to_thread(engine.flush_cache):
            raise APIError(400, "cache not flushed: requests are running; retry when the server is idle")
        return json_response({"success": True, "message": "Cache flushed."})

    @accepts(ABORT)
    async def abort_request(request: Request) -> Response:
        """Aborts the request `rid` (every branch of it), or every request with `abort_all`."""
        body = await ABORT.read(request)
        rid = body.get("rid")
        if body.get("abort_all", False):
            return json_response({"success": True, "aborted": engine.abort_all()})
        if rid is None:
            raise APIError(400, "`rid` is required (or `abort_all: true`)", param="rid")
        return json_response({"success": True, "aborted": int(engine.abort(rid))})

    @accepts(OPEN_SESSION)
    async def open_session(request: Request) -> Response:
        """Opens a session (a conversation kept in the cache); answers its id."""
        body = await OPEN_SESSION.read(request)
        sid = engine.open_session(body.get("capacity_of_str_len"), body.get("session_id"))
        return json_response(sid)  # SGLang answers the bare id

    @accepts(CLOSE_SESSION)
    async def close_session(request: Request) -> Response:
        """Closes a session and releases what it held."""
        body = await CLOSE_SESSION.read(request)
        await asyncio.to_thread(engine.close_session, body.get("session_id"))
        return json_response({"success": True})

    async def get_token_usage(request: Request) -> Response:
        """KV pool use in tokens, requests, cache hit rate."""
        info = await asyncio.to_thread(engine.get_server_info)
        page = info["page_size"]
        used = info["locked_pages"] + info["private_pages"]  # neither free nor reclaimable
        return json_response({
            "total_tokens": info["total_pages"] * page, "max_total_num_tokens": info["max_total_num_tokens"],
            "used_tokens": used * page, "cached_tokens": info["evictable_pages"] * page,
            "free_tokens": info["free_pages"] * page, "token_usage": used / max(info["total_pages"], 1),
            "num_running_reqs": info["num_running_reqs"], "num_waiting_reqs": info["num_waiting_reqs"],
            "num_requests": info["num_running_reqs"] + info["num_waiting_reqs"],
            "cache_hit_rate": info["cache_hit_rate"], **_host_usage(info, page)})

    async def metrics(request: Request) -> Response:
        """Prometheus metrics."""
        return Response(await asyncio.to_thread(state.metrics.render), media_type=CONTENT_TYPE)

    async def radix_tree(request: Request) -> Response:
        """The radix cache's nodes, pages and hits."""
        return json_response(await asyncio.to_thread(engine.radix_tree))

    @accepts(CONCATE)
    async def concate_and_append_request(request: Request) -> Response:
        """SGLang's frontend posts this on `join(mode="concate_and_append")`; the joined text
        comes with its next /generate (a cache hit there), so there is nothing to do but check."""
        body = await CONCATE.read(request)
        src = body.get("src_rids")
        if not isinstance(src, list) or not src or not all(isinstance(r, str) and r for r in src):
            raise APIError(400, f"`src_rids` must be a non-empty list of non-empty strings, got "
                                f"{json.dumps(src)[:60]}", param="src_rids")
        body.get("dst_rid")
        return json_response({"success": True})

    @accepts(START_PROFILE)
    async def start_profile(request: Request) -> Response:
        """Starts a JAX profiler trace into a new folder under --profile-dir."""
        await START_PROFILE.read(request)
        path = await asyncio.to_thread(engine.profiler.start)
        return json_response({"success": True, "message": f"profiling into {path}", "output_dir": path})

    async def stop_profile(request: Request) -> Response:
        """Stops the trace; answers where it was written."""
        path = await asyncio.to_thread(engine.profiler.stop)
        return json_response({"success": True, "message": f"profile written to {path}", "output_dir": path})

    return [
        Route("/generate", generate, methods=["POST"]),
        # newer SGLang clients (0.5.x) call the names without `get_`; older ones the others
        Route("/get_model_info", get_model_info, methods=["GET"]),
        Route("/model_info", get_model_info, methods=["GET"]),
        Route("/get_server_info", get_server_info, methods=["GET"]),
        Route("/server_info", get_server_info, methods=["GET"]),
        Route("/get_load", get_load, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/health_generate", health_generate, methods=["GET"]),
        Route("/flush_cache", flush_cache, methods=["POST", "GET"]),
        Route("/clear_radix_cache", flush_cache, methods=["POST", "GET"]),  # the name some guides use
        Route("/abort_request", abort_request, methods=["POST"]),
        Route("/open_session", open_session, methods=["POST"]),
        Route("/close_session", close_session, methods=["POST"]),
        Route("/get_token_usage", get_token_usage, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/radix_tree", radix_tree, methods=["GET"]),
        Route("/concate_and_append_request", concate_and_append_request, methods=["POST"]),
        Route("/start_profile", start_profile, methods=["GET", "POST"]),
        Route("/stop_profile", stop_profile, methods=["GET", "POST"]),
    ]


async def _chunks(deltas: AsyncIterator, builders: list[ResponseBuilder], multi: bool) -> AsyncIterator[bytes]:
    """One SSE event per delta that adds text (or ends its branch): the branch's chunk
    (cumulative text, the logprob entries not sent yet). A token whose text waits for the
    next one (part of a UTF-8 character, a possible stop string) is sent with it: SGLang's
    client drops events that add no text, and their logprob entries with them."""
    async with aclosing(deltas):
        async for index, delta in deltas:
            builder = builders[index]
            builder.add(delta)
            if not delta.text and not delta.finished:
                continue
            chunk = builder.chunk()
            if multi:
                chunk["index"] = index
            yield event(chunk)


async def _finals(deltas: AsyncIterator, builders: list[ResponseBuilder]) -> list[dict]:
    """Every branch's final response, in branch order."""
    async with aclosing(deltas):
        async for index, delta in deltas:
            builders[index].add(delta)
    return [b.final() for b in builders]


def _host_usage(info: dict, page: int) -> dict:
    """The host tier of the hierarchical cache in tokens (nothing when it is off)."""
    if "host_total_pages" not in info:
        return {}
    return {f"host_{state}_tokens": info[f"host_{state}_pages"] * page
            for state in ("total", "free", "evictable", "locked")}
