"""What a program needs from a model server, on top of SGLang's `/generate`.

`Backend` holds the logic (generate, stream, score `select` choices, cache a prefix); a
subclass gives only the transport: `_generate(body)` (a `/generate` response: a dict, or a
list for list inputs and n > 1) and `_stream(body)` (its SSE chunks as dicts). So the
in-process engine and the HTTP endpoint send the same requests and behave the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jaxserve.lang.chat_template import ChatTemplate
from jaxserve.lang.choices import ChoicesDecision
from jaxserve.lang.params import generate_body

# Streamed meta_info carries only the logprob entries new since the previous chunk.
_INCREMENTAL = ("output_token_logprobs", "output_top_logprobs")


class BackendError(RuntimeError):
    """The server refused or failed a request: its status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class Backend:
    chat_template: ChatTemplate
    model_name: str

    # ---- transport (subclasses) ----

    def _generate(self, body: dict[str, Any]) -> dict | list[dict]:
        raise NotImplementedError

    def _stream(self, body: dict[str, Any]) -> Iterator[dict]:
        raise NotImplementedError

    def flush_cache(self) -> bool:
        raise NotImplementedError

    def get_server_info(self) -> dict[str, Any]:
        raise NotImplementedError

    # ---- what programs use ----

    def generate(self, text: str, params: dict[str, Any]) -> tuple[str | list[str], dict | list[dict]]:
        """The completion of `text` (a list of them when n > 1) and its meta_info."""
        out = self._generate(generate_body(text, params))
        for one in out if isinstance(out, list) else [out]:
            _raise_if_aborted(one["meta_info"])
        if isinstance(out, list):
            return [o["text"] for o in out], [o["meta_info"] for o in out]
        return out["text"], out["meta_info"]

    def generate_stream(self, text: str, params: dict[str, Any]) -> Iterator[tuple[str, dict]]:
        """(new text, meta_info so far) pieces; logprob lists in meta_info accumulate."""
        seen, merged = 0, {}
        for chunk in self._stream({**generate_body(text, params), "stream": True}):
            meta = dict(chunk["meta_info"])
            for key in _INCREMENTAL:
                if key in meta:
                    meta[key] = merged.get(key, []) + list(meta[key])
            merged = meta
            _raise_if_aborted(meta)
            piece = chunk["text"][seen:]
            seen = len(chunk["text"])
            yield piece, merged

    def cache_prefix(self, text: str) -> dict:
        """Prefill `text` into the radix cache (no token generated); its meta_info."""
        return self._generate({"text": text, "sampling_params": {"max_new_tokens": 0}})["meta_info"]

    def select(self, text: str, choices: list[str], temperature: float, method) -> ChoicesDecision:
        """Score each choice as a continuation of `text` from input logprobs, in one batched
        prefill-only request after the prefix is cached, and let `method` decide."""
        if temperature > 1e-5:
            raise ValueError("select scores choices greedily; it takes temperature 0")
        prompt_tokens = self.cache_prefix(text)["prompt_tokens"] if text else 0
        start = max(prompt_tokens - 2, 0)  # the prefix's last tokens may merge with a choice's first
        prefix = [text] if text else []
        scored = self._generate({
            "text": prefix + [text + c for c in choices], "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": start})
        prefix_ids = [e[1] for e in scored[0]["meta_info"]["input_token_logprobs"]] if text else []
        per_choice = [_choice_entries(r["meta_info"]["input_token_logprobs"], prefix_ids)
                      for r in scored[len(prefix):]]
        unconditional = None
        if method.requires_unconditional_logprobs:
            alone = self._generate({"input_ids": [[e[1] for e in entries] for entries in per_choice],
                                    "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                                    "logprob_start_len": 0})
            unconditional = [r["meta_info"]["input_token_logprobs"] for r in alone]
        decision = method(choices=choices, normalized_prompt_logprobs=[_mean(e) for e in per_choice],
                          input_token_logprobs=per_choice, output_token_logprobs=[[] for _ in choices],
                          unconditional_token_logprobs=unconditional)
        metas = [r["meta_info"] for r in scored[len(prefix):]]
        decision.meta_info.update(prompt_tokens=[m["prompt_tokens"] for m in metas],
                                  cached_tokens=[m["cached_tokens"] for m in metas])
        return decision


def _raise_if_aborted(meta: dict) -> None:
    reason = meta.get("finish_reason") or {}
    if reason.get("type") == "abort":
        raise BackendError(500, f"the request was aborted: {reason.get('message')}")


def _choice_entries(entries: list, prefix_ids: list[int]) -> list:
    """A choice's own token entries: those past where its tokens stop matching the prefix's."""
    same = 0
    while same < min(len(prefix_ids), len(entries) - 1) and entries[same][1] == prefix_ids[same]:
        same += 1
    return entries[same:]


def _mean(entries: list) -> float:
    values = [e[0] for e in entries if e[0] is not None]
    return sum(values) / len(values) if values else 0.0
