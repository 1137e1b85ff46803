"""OutputCollector: scheduler outputs of one request -> SGLang `/generate` response dicts.

Detokenizes incrementally, applies stop strings and stop regexes on the text (the scheduler
only knows token ids), holds back a streamed tail that may still become a stop string, and
formats logprobs as `[logprob, token_id, text or None]`.
"""

from __future__ import annotations

import re
import time

from jaxserve.sampling import SamplingParams
from jaxserve.scheduler.request import RequestOutput
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer


def stable_text(text: str, stops: list[str]) -> str:
    """`text` minus any tail that could still grow into a stop string.

    Streamed text must only ever grow: if "Hel" went out and the next token completes the
    stop string "Hello", the final text is cut before "Hel", which a client that already
    printed it cannot undo. So a running request's tail that is a prefix of a stop string
    is held back until it is decided.
    """
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return text[: len(text) - hold] if hold else text


class OutputCollector:
    def __init__(self, rid: str, tokenizer: Tokenizer, params: SamplingParams, *, return_logprob: bool,
                 return_text_in_logprobs: bool, top_logprobs_num: int, prompt_tokens: int):
        self.rid = rid
        self.tokenizer = tokenizer
        self.params = params
        self.return_logprob = return_logprob
        self.with_text = return_text_in_logprobs
        self.top_logprobs_num = top_logprobs_num
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.stop_regexes = [re.compile(p) for p in (params.stop_regex or [])]
        self.start = time.monotonic()
        self.text = ""
        self.output_ids: list[int] = []
        self.output_logprobs: list = []
        self.input_logprobs: list = []
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.finish_reason: dict | None = None
        self.stopped_by_text = False  # a stop string matched: ignore what the scheduler still sends

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, out: RequestOutput) -> bool:
        """Fold in one scheduler output. True when a stop string just ended the request."""
        self.cached_tokens = out.cached_tokens
        self.input_logprobs.extend(out.input_logprobs)
        if self.stopped_by_text:
            return False
        self.output_ids.extend(out.new_token_ids)
        self.output_logprobs.extend(out.output_logprobs)
        searched_from = max(len(self.text) - self._longest_stop(), 0)
        self.text += self.detok.add(out.new_token_ids)
        if out.finished:
            self.text += self.detok.flush()
        hit = self._find_stop(searched_from)
        if hit is not None:
            end, matched = hit
            self.text = self.text[:end]
            self.finish_reason = {"type": "stop", "matched": matched}
            self.stopped_by_text = True
            return True
        if out.finished:
            self.finish_reason = out.finish_reason
        return False

    def _longest_stop(self) -> int:
        return max((len(s) for s in self.params.stop or []), default=0) + 8

    def _find_stop(self, searched_from: int) -> tuple[int, str] | None:
        best = None
        for stop in self.params.stop or []:
            i = self.text.find(stop, searched_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i + (len(stop) if self.params.no_stop_trim else 0), stop)
        for rx in self.stop_regexes:
            m = rx.search(self.text)
            if m and (best is None or m.start() < best[0]):
                best = (m.end() if self.params.no_stop_trim else m.start(), m.group(0))
        return best

    def _format(self, entries) -> tuple[list, list]:
        values, tops = [], []
        for logprob, token, top in entries:
            values.append([logprob, token, self.tokenizer.id_to_text(token) if self.with_text else None])
            if self.top_logprobs_num:
                tops.append([[lp, t, self.tokenizer.id_to_text(t) if self.with_text else None] for lp, t in top])
            else:
                tops.append(None)
        return values, tops

    def result(self) -> dict:
        """The response dict so far (`finish_reason` is null while running)."""
        meta = {
            "id": self.rid,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
            "e2e_latency": time.monotonic() - self.start,
        }
        if self.return_logprob:
            meta["input_token_logprobs"], meta["input_top_logprobs"] = self._format(self.input_logprobs)
            meta["output_token_logprobs"], meta["output_top_logprobs"] = self._format(self.output_logprobs)
        text = self.text if self.finished else stable_text(self.text, self.params.stop or [])
        return {"text": text, "output_ids": list(self.output_ids), "meta_info": meta}
