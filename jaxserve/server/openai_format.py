"""OpenAI response bodies and stream chunks, built from the engine's deltas in linear time.

Chunks follow what the `openai` package parses: a chat stream opens each choice with
`delta.role`, sends each delta's new text as it is in `delta.content` (`text` for
completions), ends each choice with a chunk carrying `finish_reason`, and sends a
usage-only chunk (`choices: []`) last only when `stream_options.include_usage` is set.
Each delta is formatted once, when it arrives: a chunk holds only its new text and its
new logprob entries, and a non-streamed response joins the pieces once at the end.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator, Iterator

from jaxserve.engine.inputs import GenerateInput
from jaxserve.scheduler import RequestOutput
from jaxserve.server.openai_protocol import OpenAIRequest
from jaxserve.server.sse import event

__all__ = ["OpenAIFormatter"]

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


class _Choice:
    """One branch's formatting state."""

    def __init__(self, echo: str, first_of_prompt: bool, logprobs: dict | None):
        self.echo = echo  # completions with echo: the prompt text, sent before the completion
        self.first_of_prompt = first_of_prompt  # usage counts the prompt once, on this branch
        self.opened = False  # streaming: the role (or echo) chunk went out
        self.chars = 0  # characters of completion text so far (completion logprobs' text_offset)
        self.input_offset = 0  # text_offset of the next echoed prompt token
        self.parts: list[str] = []  # not streaming: the text pieces, joined once at the end
        self.logprobs = logprobs  # not streaming: every entry so far
        self.last: RequestOutput | None = None  # the finished delta


class OpenAIFormatter:
    """Formats one call's deltas as an OpenAI response (`collect`) or stream (`stream`)."""

    def __init__(self, req: OpenAIRequest, gen: GenerateInput, tokenizer, created: int):
        self.req = req
        self.text_of = tokenizer.id_to_text
        kind = "chat.completion" if req.chat else "text_completion"
        self.head = {"id": req.rid, "object": kind, "created": created, "model": req.model}
        self.choices = [_Choice(req.echo_texts[p] if req.echo_texts is not None else "", j == 0, self._empty_logprobs())
                        for p, params in enumerate(gen.params) for j in range(params.n)]

    # ---- the two ways to answer ----

    async def collect(self, deltas: AsyncIterator[tuple[int, RequestOutput]]) -> dict:
        """The whole response body."""
        async with aclosing(deltas):
            async for index, delta in deltas:
                choice = self.choices[index]
                choice.parts.append(delta.text)
                for name, entries in (self._logprobs(choice, delta) or {}).items():
                    choice.logprobs[name] += entries
                self._advance(choice, delta)
        body = []
        for index, choice in enumerate(self.choices):
            text = choice.echo + "".join(choice.parts)
            out: dict[str, Any] = {"index": index}
            if self.req.chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["text"] = text
            out["logprobs"] = choice.logprobs
            out.update(_finish_fields(choice.last.finish_reason if choice.last else None))
            body.append(out)
        return {**self.head, "choices": body, "usage": self._usage()}

    async def stream(self, deltas: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[bytes]:
        """SSE events: per delta its new text and logprob entries, then the usage if asked for."""
        self.head["object"] = "chat.completion.chunk" if self.req.chat else "text_completion"
        if self.req.include_usage:
            self.head["usage"] = None  # OpenAI: null on every chunk but the last
        async with aclosing(deltas):
            async for index, delta in deltas:
                for chunk in self._chunks(index, delta):
                    yield chunk
        if self.req.include_usage:
            yield event({**self.head, "choices": [], "usage": self._usage()})

    # ---- per delta ----

    def _chunks(self, index: int, delta: RequestOutput) -> Iterator[bytes]:
        choice = self.choices[index]
        if not choice.opened:  # opened at its first delta, so that an engine refusal is still an HTTP error
            choice.opened = True
            if self.req.chat:
                yield event({**self.head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}]})
            elif choice.echo:
                yield self._chunk(index, choice.echo)
        logprobs = self._logprobs(choice, delta)
        if delta.text or (logprobs and any(logprobs.values())):
            yield self._chunk(index, delta.text, logprobs)
        self._advance(choice, delta)
        if delta.finished:
            yield self._chunk(index, None, finish=delta.finish_reason)

    def _chunk(self, index: int, text: str | None, logprobs: dict | None = None, finish: dict | None = None) -> bytes:
        choice: dict[str, Any] = {"index": index}
        if self.req.chat:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        choice["logprobs"] = logprobs
        choice.update(_finish_fields(finish))
        return event({**self.head, "choices": [choice]})

    def _advance(self, choice: _Choice, delta: RequestOutput) -> None:
        choice.chars += len(delta.text)
        if delta.finished:
            choice.last = delta

    # ---- logprobs: the delta's new entries only ----

    def _empty_logprobs(self) -> dict | None:
        if not self.req.logprobs:
            return None
        if self.req.chat:
            return {"content": []}
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _logprobs(self, choice: _Choice, delta: RequestOutput) -> dict | None:
        """The delta's logprob entries (for completions with echo, the prompt's first)."""
        if not self.req.logprobs:
            return None
        if self.req.chat:
            return {"content": [self._chat_entry(entry) for entry in delta.output_logprobs]}
        columns = self._empty_logprobs()
        if self.req.echo_texts is not None:  # prompt logprobs only with echo (prefill-only calls have them)
            choice.input_offset = self._columns(columns, delta.input_logprobs, choice.input_offset)
        self._columns(columns, delta.output_logprobs, len(choice.echo) + choice.chars)
        return columns

    def _chat_entry(self, entry: tuple) -> dict:
        logprob, token, top = entry
        text = self.text_of(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                                 for lp, t in ((lp, self.text_of(i)) for lp, i in top)]}

    def _columns(self, columns: dict, entries: list, offset: int) -> int:
        """Appends completions-style entries starting at text `offset`; returns the offset after them."""
        for logprob, token, top in entries:
            text = self.text_of(token)
            columns["tokens"].append(text)
            columns["token_logprobs"].append(logprob)
            columns["top_logprobs"].append({self.text_of(i): lp for lp, i in top} if top else None)
            columns["text_offset"].append(offset)
            offset += len(text)
        return offset

    def _usage(self) -> dict:
        """Prompt and cached tokens once per prompt (its first branch), completion tokens over all."""
        prompt = cached = completion = 0
        for choice in self.choices:
            if choice.last is None:  # the stream ended early
                continue
            completion += choice.last.completion_tokens
            if choice.first_of_prompt:
                prompt += choice.last.prompt_tokens
                cached += choice.last.cached_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


def _finish_fields(reason: dict | None) -> dict:
    if reason is None:
        return {"finish_reason": None}
    fields: dict[str, Any] = {"finish_reason": _FINISH.get(reason["type"], reason["type"])}
    if "matched" in reason:
        fields["matched_stop"] = reason["matched"]
    return fields
