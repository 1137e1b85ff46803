"""SGLang `/generate` response dicts, built from a branch's deltas in linear time.

Each delta is formatted once when it arrives (logprob entries become
`[logprob, token_id, text or None]`); `final()` is the whole response, `chunk()` a
streamed one: cumulative text and ids (what SGLang's clients slice), and only the
logprob entries new since the previous chunk, with `output_token_logprobs_length`
the running total (what newer SGLang clients expect).
"""

from __future__ import annotations

import time

from jaxserve.engine.inputs import LogprobOptions
from jaxserve.scheduler import RequestOutput


class ResponseBuilder:
    def __init__(self, rid: str, options: LogprobOptions, tokenizer, start: float | None = None):
        self.rid = rid
        self.options = options
        self.tokenizer = tokenizer
        self.start = time.monotonic() if start is None else start
        self.text_parts: list[str] = []
        self.output_ids: list[int] = []
        self.logprobs: dict[str, list] = {name: [] for name in _LOGPROB_FIELDS}
        self.sent = {name: 0 for name in _LOGPROB_FIELDS}  # entries already in a chunk
        self.last: RequestOutput | None = None

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished

    def add(self, out: RequestOutput) -> None:
        self.last = out
        if out.text:
            self.text_parts.append(out.text)
        self.output_ids.extend(out.token_ids)
        if self.options.return_logprob:
            for kind, entries in (("input", out.input_logprobs), ("output", out.output_logprobs)):
                values, tops = self._format(entries)
                self.logprobs[f"{kind}_token_logprobs"] += values
                self.logprobs[f"{kind}_top_logprobs"] += tops

    @property
    def text(self) -> str:
        if len(self.text_parts) > 1:
            self.text_parts = ["".join(self.text_parts)]
        return self.text_parts[0] if self.text_parts else ""

    def final(self) -> dict:
        return self._dict(incremental=False)

    def chunk(self) -> dict:
        return self._dict(incremental=True)

    def _dict(self, incremental: bool) -> dict:
        out = self.last
        meta = {
            "id": self.rid,
            "prompt_tokens": out.prompt_tokens if out else 0,
            "completion_tokens": len(self.output_ids),
            "cached_tokens": out.cached_tokens if out else 0,
            "forced_tokens": out.forced_tokens if out else 0,  # output tokens a grammar forced (jump-forward)
            "finish_reason": out.finish_reason if out else None,
            "e2e_latency": time.monotonic() - self.start,
        }
        if out is not None and out.cached_tokens_details is not None:
            meta["cached_tokens_details"] = out.cached_tokens_details  # the hierarchical cache's tiers
        if out is not None and out.attention_sparsity_ratio is not None:
            meta["attention_sparsity_ratio"] = out.attention_sparsity_ratio  # sparse attention: KV skipped
        if self.options.return_logprob:
            for name, entries in self.logprobs.items():
                meta[name] = entries[self.sent[name] :] if incremental else entries
                if incremental:
                    self.sent[name] = len(entries)
            meta["output_token_logprobs_length"] = len(self.logprobs["output_token_logprobs"])
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}

    def _format(self, entries) -> tuple[list, list]:
        with_text, k = self.options.return_text_in_logprobs, self.options.top_logprobs_num
        text = self.tokenizer.id_to_text
        values, tops = [], []
        for logprob, token, top in entries:
            values.append([logprob, token, text(token) if with_text else None])
            tops.append([[lp, t, text(t) if with_text else None] for lp, t in top] if k else None)
        return values, tops


_LOGPROB_FIELDS = ("input_token_logprobs", "input_top_logprobs", "output_token_logprobs", "output_top_logprobs")
