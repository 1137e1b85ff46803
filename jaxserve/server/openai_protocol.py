"""OpenAI request bodies -> `engine.prepare` arguments (prompts, SGLang sampling params,
logprob options).

Field names and defaults follow OpenAI's API (`max_tokens` 16 for completions, the rest of
the context for chat); the extra fields SGLang and vLLM accept (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, ...) are accepted too. Unknown fields are refused
with a 400 that lists the valid ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from typing import Any

import jinja2

from jaxserve.sampling.params import SamplingParams
from jaxserve.server.protocol import (BOOL, INT, NUMBER, OBJECT, STR, APIError, Body, Kind, RequestModel,
                                      checked_later, int_range, nested)
from jaxserve.server.state import ServerState

__all__ = ["CHAT", "COMPLETION", "OpenAIRequest", "parse_chat", "parse_completion", "openai_message"]

_SAMPLING_SCHEMA = SamplingParams.schema()["properties"]


def _sampling_kind(field: str, base: Kind) -> Kind:
    """`base`'s check, with the schema (ranges included) of the sampling field it becomes."""
    return Kind(base.check, base.what, _SAMPLING_SCHEMA[field])


_STOP = checked_later(_SAMPLING_SCHEMA["stop"], "stop strings")
_IDS = checked_later(_SAMPLING_SCHEMA["stop_token_ids"], "token ids")
# OpenAI field -> (SGLang sampling_params field, kind)
_SAMPLING = {name: (field, _sampling_kind(field, kind)) for name, (field, kind) in {
    "temperature": ("temperature", NUMBER), "top_p": ("top_p", NUMBER),
    "presence_penalty": ("presence_penalty", NUMBER), "frequency_penalty": ("frequency_penalty", NUMBER),
    "seed": ("sampling_seed", INT), "stop": ("stop", _STOP), "logit_bias": ("logit_bias", OBJECT),
    # extensions (SGLang, vLLM)
    "top_k": ("top_k", INT), "min_p": ("min_p", NUMBER), "repetition_penalty": ("repetition_penalty", NUMBER),
    "ignore_eos": ("ignore_eos", BOOL), "min_tokens": ("min_new_tokens", INT),
    "stop_token_ids": ("stop_token_ids", _IDS), "skip_special_tokens": ("skip_special_tokens", BOOL),
    "spaces_between_special_tokens": ("spaces_between_special_tokens", BOOL),
    "no_stop_trim": ("no_stop_trim", BOOL), "regex": ("regex", STR), "ebnf": ("ebnf", STR),
}.items()}
_MAX_TOKENS = _sampling_kind("max_new_tokens", INT)
STREAM_OPTIONS = RequestModel("StreamOptions", "the stream_options", {"include_usage": BOOL},
                              ignored=("continuous_usage_stats", "include_obfuscation"))
_RESPONSE_FORMAT = Kind(OBJECT.check, OBJECT.what, {"type": "object", "properties": {
    "type": {"enum": ["text", "json_object", "json_schema"]},
    "json_schema": {"type": "object", "properties": {"name": {"type": "string"}, "schema": {"type": "object"}}}},
    "required": ["type"]})
_COMMON = {"model": STR, "max_tokens": _MAX_TOKENS, "n": _sampling_kind("n", INT), "stream": BOOL,
           "stream_options": nested(STREAM_OPTIONS), "rid": STR, "response_format": _RESPONSE_FORMAT, **{name: kind for name, (_, kind) in _SAMPLING.items()}}
# SGLang's router re-sends every request with its own defaults; reasoning separation is a
# no-op without a reasoning parser, and hidden states are refused unless false.
_IGNORED = ("user", "store", "metadata", "service_tier", "separate_reasoning", "stream_reasoning")
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_IDS_OR_TEXT = [{"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                _TOKEN_IDS, {"type": "array", "items": _TOKEN_IDS, "minItems": 1}]
COMPLETION = RequestModel("CompletionRequest", "the /v1/completions request", {
    **_COMMON, "prompt": checked_later({"oneOf": _IDS_OR_TEXT}, "text, texts, token ids or lists of token ids"),
    "logprobs": int_range(0, 20), "echo": BOOL, "best_of": _sampling_kind("n", INT),
}, required=("model", "prompt"), ignored=_IGNORED, unsupported=("suffix", "return_hidden_states"))
_TEXT_PART = {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
              "required": ["type", "text"]}
_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"type": "string", "minLength": 1},
    # null only in an assistant turn with tool_calls
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]}}}
CHAT = RequestModel("ChatCompletionRequest", "the /v1/chat/completions request", {
    **_COMMON, "messages": checked_later({"type": "array", "items": _MESSAGE, "minItems": 1},
                                         "rendered by the chat template"),
    "max_completion_tokens": _MAX_TOKENS, "logprobs": BOOL, "top_logprobs": int_range(0, 20),
    "chat_template_kwargs": OBJECT,
}, required=("model", "messages"), ignored=(*_IGNORED, "parallel_tool_calls", "tool_choice"),
    unsupported=("tools", "functions", "function_call", "audio", "modalities", "prediction", "web_search_options",
                 "return_hidden_states", "continue_final_message"))

# Engine messages name SGLang fields; OpenAI clients know them by these names.
_RENAMES = (("sampling_params.max_new_tokens", "max_tokens"), ("max_new_tokens", "max_tokens"),
            ("sampling_params.min_new_tokens", "min_tokens"), ("sampling_params.sampling_seed", "seed"),
            ("sampling_params.", ""))


def openai_message(message: str) -> str:
    """An engine error message with OpenAI's field names."""
    for old, new in _RENAMES:
        message = message.replace(old, new)
    return message


@dataclasses.dataclass
class OpenAIRequest:
    """One parsed OpenAI request: the `engine.prepare` arguments and how to answer."""

    chat: bool
    model: str
    rid: str
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    prepare: dict[str, Any]  # keyword arguments of `engine.prepare`
    echo_texts: list[str] | None = None  # completions with echo: the prompt texts to prepend


async def parse_completion(data: dict, state: ServerState) -> OpenAIRequest:
    """A `/v1/completions` body. Text prompts go to the engine as text (it tokenizes them off
    the event loop)."""
    body = COMPLETION.parse(data)
    model, n, stream, include_usage = _common(body, state)
    field, prompts = _completion_prompts(body.get("prompt"))
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise APIError(400, f"`best_of` ({best_of}) other than `n` ({n}) is not supported", param="best_of")
    top = body.get("logprobs")
    echo = body.get("echo", False)
    sampling = {**_sampling(body, n), **_response_format(body), "max_new_tokens": body.get("max_tokens", 16)}
    rid = _rid(body, "cmpl")
    echo_texts = None
    if echo:  # token-id prompts echo as their text, decoded off the loop
        echo_texts = prompts if field == "prompt" else await asyncio.to_thread(
            _decode_all, state.engine.tokenizer, prompts, state.engine.model.config.vocab_size)
    prepare = {field: prompts, "sampling_params": sampling,
               "rid": [rid] if len(prompts) == 1 else [f"{rid}-p{i}" for i in range(len(prompts))],
               "return_logprob": top is not None, "top_logprobs_num": top or 0,
               "logprob_start_len": 0 if echo and top is not None else -1}
    return OpenAIRequest(False, model, rid, n, stream, include_usage, top is not None, prepare, echo_texts)


async def parse_chat(data: dict, state: ServerState) -> OpenAIRequest:
    """A `/v1/chat/completions` body; the messages go through the model's chat template, in a
    worker thread (rendering and tokenizing a long conversation must not stall the loop)."""
    body = CHAT.parse(data)
    model, n, stream, include_usage = _common(body, state)
    kwargs = body.get("chat_template_kwargs", {})
    if {"messages", "add_generation_prompt", "tokenize"} & set(kwargs):
        raise APIError(400, "chat_template_kwargs may not set messages, add_generation_prompt or tokenize",
                       param="chat_template_kwargs")
    logprobs = body.get("logprobs", False)
    top = body.get("top_logprobs")
    if top and not logprobs:
        raise APIError(400, "`top_logprobs` needs `logprobs: true`", param="top_logprobs")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = {**_sampling(body, n), **_response_format(body)}
    rid = _rid(body, "chatcmpl")
    try:
        ids = await asyncio.to_thread(state.engine.tokenizer.apply_chat_template, data["messages"],
                                      add_generation_prompt=True, tokenize=True, **kwargs)
    except (ValueError, jinja2.TemplateError) as e:
        raise APIError(400, f"invalid `messages`: {e}", param="messages") from None
    if max_tokens is None:  # OpenAI's default: whatever the context has left
        max_tokens = max(state.engine.context_length - len(ids), 1)
    prepare = {"input_ids": ids, "sampling_params": {**sampling, "max_new_tokens": max_tokens}, "rid": rid,
               "return_logprob": logprobs, "top_logprobs_num": top or 0}
    return OpenAIRequest(True, model, rid, n, stream, include_usage, logprobs, prepare)


def _common(body: Body, state: ServerState) -> tuple[str, int, bool, bool]:
    model = body.get("model")
    if not state.accepts_model(model):
        raise APIError(404, f"the model `{model}` does not exist; this server serves `{state.model_name}`",
                       param="model", code="model_not_found")
    n = body.get("n", 1)
    stream = body.get("stream", False)
    options = STREAM_OPTIONS.parse(body.get("stream_options", {}))
    include_usage = options.get("include_usage", False)
    return model, n, stream, include_usage


def _sampling(body: Body, n: int) -> dict[str, Any]:
    params: dict[str, Any] = {"n": n}
    for name, (field, kind) in _SAMPLING.items():
        value = body.get(name)
        if value is not None:
            params[field] = value
    return params


def _response_format(body: Body) -> dict[str, Any]:
    fmt = body.get("response_format")
    if fmt is None or fmt.get("type") == "text":
        return {}
    if fmt.get("type") == "json_object":
        return {"json_schema": json.dumps({"type": "object"})}
    if fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        schema = fmt["json_schema"].get("schema", {})  # no schema: any JSON value
        return {"json_schema": schema if isinstance(schema, str) else json.dumps(schema)}
    raise APIError(400, "`response_format.type` must be text, json_object or json_schema (with a json_schema "
                        "object)", param="response_format")


def _completion_prompts(prompt: Any) -> tuple[str, list]:
    """The `engine.prepare` field (`prompt` for text, `input_ids`) and the list of prompts of
    a `prompt`. Only the shape is read here; the engine checks the ids."""
    if isinstance(prompt, str):
        return "prompt", [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "prompt", prompt
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return "input_ids", [prompt]
        if all(isinstance(p, list) for p in prompt):
            return "input_ids", prompt
    if prompt is None:
        raise APIError(400, "`prompt` is required", param="prompt")
    raise APIError(400, "`prompt` must be a string, a list of strings, a list of token ids or a list of such "
                        "lists (non-empty)", param="prompt")


def _decode_all(tokenizer, id_lists: list[list[int]], vocab: int) -> list[str]:
    if not all(_is_token(t, vocab) for ids in id_lists for t in ids):  # checked here before the engine sees them
        raise APIError(400, f"`prompt` token ids must be integers in [0, {vocab})", param="prompt")
    return [tokenizer.decode(ids) for ids in id_lists]


def _is_token(t: Any, vocab: int) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab


def _rid(body: Body, prefix: str) -> str:
    return body.get("rid") or f"{prefix}-{uuid.uuid4().hex}"
