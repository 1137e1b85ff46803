"""OpenAI-compatible routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

Responses and stream chunks follow what the `openai` package parses: a chat stream opens
each choice with `delta.role`, sends only the new text in each `delta.content`, ends each
choice with a chunk carrying `finish_reason`, and sends a usage-only chunk (`choices: []`)
last only when `stream_options.include_usage` is set.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jaxserve.errors import InvalidRequestError
from jaxserve.server.generation import Generation, Prompt
from jaxserve.server.openai_protocol import OpenAIRequest, openai_message, parse_chat, parse_completion
from jaxserve.server.protocol import APIError, json_response, read_json_object
from jaxserve.server.sse import event
from jaxserve.server.state import ServerState

__all__ = ["openai_routes"]

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def openai_routes(state: ServerState) -> list[Route]:
    """The OpenAI routes bound to `state`."""
    started = int(time.time())

    async def models(request: Request) -> Response:
        card = {"id": state.model_name, "object": "model", "created": started, "owned_by": "jaxserve",
                "root": state.args.model_path or state.model_name, "max_model_len": state.engine.context_length}
        return json_response({"object": "list", "data": [card]})

    async def completions(request: Request) -> Response:
        return await _serve(state, request, parse_completion(await read_json_object(request), state))

    async def chat_completions(request: Request) -> Response:
        return await _serve(state, request, parse_chat(await read_json_object(request), state))

    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]


async def _serve(state: ServerState, request: Request, req: OpenAIRequest) -> Response:
    prompts = [Prompt(ids, sp, rid) for ids, sp, rid in zip(req.prompts, req.sampling_params, req.rids)]
    try:
        generation = await state.begin(prompts, req.options)
    except InvalidRequestError as e:
        raise APIError(400, openai_message(str(e))) from None
    view = _View(req, generation, int(time.time()))
    if req.stream:
        return state.stream(generation, view.stream())
    results = await state.run(request, generation)
    return json_response(view.response(dict(enumerate(results))))


class _View:
    """Renders one generation as an OpenAI response or as stream chunks."""

    def __init__(self, req: OpenAIRequest, generation: Generation, created: int):
        self.req, self.generation = req, generation
        kind = "chat.completion" if req.chat else "text_completion"
        self.head = {"id": req.rid, "object": kind, "created": created, "model": req.model}

    def response(self, finals: dict[int, dict]) -> dict:
        choices = []
        for index, out in finals.items():
            meta = out["meta_info"]
            text = self._echo(index) + out["text"]
            choice: dict[str, Any] = {"index": index}
            if self.req.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice["logprobs"] = self._logprobs(meta, 0, len(self._echo(index)), with_input=True)
            choice.update(_finish_fields(meta["finish_reason"]))
            choices.append(choice)
        return {**self.head, "choices": choices, "usage": self._usage(finals)}

    async def stream(self) -> AsyncIterator[bytes]:
        head = {**self.head, "object": "chat.completion.chunk" if self.req.chat else "text_completion"}
        if self.req.include_usage:
            head["usage"] = None  # OpenAI: null on every chunk but the last
        sent_chars: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        input_sent: set[int] = set()  # completions with echo: the prompt's logprobs went out
        finals: dict[int, dict] = {}

        def chunk(index: int, delta: str | None, logprobs: Any = None, finish: dict | None = None) -> bytes:
            choice: dict[str, Any] = {"index": index}
            if self.req.chat:
                choice["delta"] = {} if delta is None else {"content": delta}
            else:
                choice["text"] = delta or ""
            choice["logprobs"] = logprobs
            choice.update(_finish_fields(finish))
            return event({**head, "choices": [choice]})

        for index in range(len(self.generation.branches)):
            sent_chars[index], sent_tokens[index] = 0, 0
            if self.req.chat:
                yield event({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
            elif self.req.echo_texts is not None:
                yield chunk(index, self._echo(index))
        async for index, out in self.generation.events():
            meta, text = out["meta_info"], out["text"]
            finished = meta["finish_reason"] is not None
            delta = text[sent_chars[index]:]
            # the prompt's logprobs are complete once the first token (or the finish) arrives
            with_input = index not in input_sent and (meta["completion_tokens"] > 0 or finished)
            logprobs = self._logprobs(meta, sent_tokens[index], len(self._echo(index)) + sent_chars[index],
                                      with_input=with_input)
            if delta or (logprobs and _has_entries(logprobs)):
                yield chunk(index, delta, logprobs)
                if with_input:
                    input_sent.add(index)
            sent_chars[index] = max(sent_chars[index], len(text))
            sent_tokens[index] = meta["completion_tokens"]
            if finished:
                finals[index] = out
                yield chunk(index, None, finish=meta["finish_reason"])
        if self.req.include_usage:
            yield event({**head, "choices": [], "usage": self._usage(finals)})

    def _echo(self, index: int) -> str:
        texts = self.req.echo_texts
        return texts[index // self.req.n] if texts is not None else ""

    def _logprobs(self, meta: dict, start: int, offset: int, *, with_input: bool) -> dict | None:
        """Logprobs of output tokens from `start` (plus the prompt's, for completions with echo)."""
        if not self.req.logprobs:
            return None
        entries = list(zip(meta["output_token_logprobs"][start:], meta["output_top_logprobs"][start:]))
        if self.req.chat:
            return {"content": [_chat_entry(e, top) for e, top in entries]}
        if with_input and self.req.echo_texts is not None:
            entries = list(zip(meta["input_token_logprobs"], meta["input_top_logprobs"])) + entries
            offset = 0
        return _completion_logprobs(entries, offset)

    def _usage(self, finals: dict[int, dict]) -> dict:
        n, prompt_tokens, cached = self.req.n, 0, 0
        for p in range(len(self.req.prompts)):
            first = finals.get(p * n)
            if first is None:  # the stream ended early
                continue
            prompt_tokens += first["meta_info"]["prompt_tokens"]
            prefill = self.generation.prefill_cached[p]
            cached += prefill if prefill is not None else first["meta_info"]["cached_tokens"]
        completion = sum(out["meta_info"]["completion_tokens"] for out in finals.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def _finish_fields(reason: dict | None) -> dict:
    if reason is None:
        return {"finish_reason": None}
    fields: dict[str, Any] = {"finish_reason": _FINISH.get(reason["type"], reason["type"])}
    if "matched" in reason:
        fields["matched_stop"] = reason["matched"]
    return fields


def _has_entries(logprobs: dict) -> bool:
    return bool(logprobs.get("content") or logprobs.get("tokens"))


def _chat_entry(entry: list, top: list | None) -> dict:
    logprob, _, text = entry
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for lp, _, t in top or []]}


def _completion_logprobs(entries: list, offset: int) -> dict:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for (logprob, _, text), top in entries:
        tokens.append(text)
        token_logprobs.append(logprob)
        top_logprobs.append({t: lp for lp, _, t in top} if top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
