"""Output delivery: a finished step's results -> per-request deltas -> their consumers.

For every row of the step: the sampled token joins the request, the `StopChecker` turns
it into new text and decides whether the request stops, owed input logprobs are
attached, and a `RequestOutput` delta goes to the request's sink. Deliveries are batched
per event loop, one thread-safe call per loop per step, so the cost per step is one
Python pass over the rows plus one wake-up per consumer loop.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import jax
import numpy as np

from jaxserve.scheduler.batch import Row
from jaxserve.scheduler.request import Request, RequestOutput, Status

logger = logging.getLogger(__name__)


class Outbox:
    """Deltas waiting for delivery, grouped by the event loop of their consumer."""

    def __init__(self):
        self.by_loop: dict[object, list[tuple[object, RequestOutput]]] = defaultdict(list)

    def add(self, req: Request, out: RequestOutput) -> None:
        self.by_loop[req.sink.loop].append((req.sink, out))

    def flush(self) -> list[str]:
        """Deliver everything; returns the rids whose consumer loop is gone (to abort)."""
        lost: list[str] = []
        for loop, items in self.by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop was closed: nobody reads these any more
                lost.extend(out.rid for _, out in items if not out.finished)
        self.by_loop.clear()
        return lost


def _put_all(items) -> None:
    for sink, out in items:
        sink.put(out)


def delta(req: Request, *, text="", input_logprobs=(), reason=None) -> RequestOutput:
    """A delta without a new token: input logprobs, or the end of the request."""
    return RequestOutput(req.rid, [], text, [], list(input_logprobs), reason, req.prompt_len, req.cached_tokens,
                         req.num_outputs, req.num_forced, req.cached_details)


class StepResults:
    """The host copies of one step's device results, fetched once."""

    def __init__(self, sampled, input_lps, want_top: bool):
        tokens, logprobs, self.top, read = sampled.fetch(want_top)
        self.tokens: list[int] = tokens.tolist()
        self.read: list[int] = read.tolist()  # KV tokens attention read per sequence (sparse attention)
        self.logprobs: list[float] = logprobs.tolist()
        self.input_lps = [jax.device_get(x) for x in input_lps]  # [(chosen, top ids, top lps)] per call

    def input_entries(self, owed: list[tuple[Row, int]]) -> dict[int, list]:
        """Input-logprob entries per row index of the step."""
        if not owed:
            return {}
        chosen = np.concatenate([c for c, _, _ in self.input_lps])
        top_ids = np.concatenate([t for _, t, _ in self.input_lps])
        top_lps = np.concatenate([t for _, _, t in self.input_lps])
        entries: dict[int, list] = {}
        at = 0
        for row, n in owed:
            k = row.req.top_logprobs_num
            prompt = row.req.prompt_ids
            entries[id(row)] = [
                (float(chosen[at + j]), int(prompt[row.logprobs_from + j]),
                 list(zip(top_lps[at + j, :k].tolist(), top_ids[at + j, :k].tolist())) if k else [])
                for j in range(n)]
            at += n
        return entries


def process_rows(rows: list[Row], results: StepResults, owed, scheduler, outbox: Outbox) -> None:
    """Fold one step's results into its requests and queue their deltas."""
    input_entries = results.input_entries(owed)
    tokens, logprobs, top = results.tokens, results.logprobs, results.top
    layers = scheduler.sparse_layers  # 0 without sparse attention
    for i, row in enumerate(rows):
        req = row.req
        req.inflight -= 1
        if req.status is Status.FINISHED:
            continue  # finished or aborted while this step ran: its results are void
        if layers and row.start >= req.prompt_len:  # a decode step
            req.kv_read += results.read[i]
            req.kv_dense += layers * (row.start + row.chunk)
        input_lps = _NONE
        if req.return_logprob:
            input_lps = input_entries.get(id(row), [])
            if req.wants_input_logprobs and row.start == 0 and req.next_input_logprob == 0:
                input_lps.insert(0, (None, int(req.prompt_ids[0]), []))  # the first prompt token has none
            req.num_input_logprobs += len(input_lps)
        if not row.emit:
            if req.prefill_only and row.start + row.chunk == req.prompt_len:
                reason = {"type": "length", "length": 0}
                scheduler.finish(req, reason)
                outbox.add(req, delta(req, input_logprobs=input_lps, reason=reason))
            elif input_lps:
                outbox.add(req, delta(req, input_logprobs=input_lps))
            continue
        if req.drop_emits:  # launched before a jump-forward that already decided this token
            req.drop_emits -= 1
            continue
        token = tokens[i]
        req.num_pending -= 1
        output_lps = _NONE
        if req.return_logprob:
            k = req.top_logprobs_num
            top_entry = list(zip(top[0][i, :k].tolist(), top[1][i, :k].tolist())) if k else []
            output_lps = [(logprobs[i], token, top_entry)]
        new = [token] if req.grammar is None else _grammar_tokens(req, token, scheduler)
        if not new:
            continue  # the grammar refused the token: the request ended with an error
        text, reason = "", None
        for j, t in enumerate(new):
            req.token_buf[req.num_tokens] = t
            req.num_tokens += 1
            piece, reason = req.stop.on_token(t, req.num_tokens - req.prompt_len, req.num_tokens)
            text += piece
            if reason is not None:  # a stop or the length limit: forced tokens after it are not output
                del new[j + 1 :]
                break
        if req.grammar is not None:
            req.num_forced += len(new) - 1  # new[0] was sampled
            if reason is None and req.grammar.done:
                reason = {"type": "stop", "matched": None}
                text += req.stop.finish_text()
        if reason is not None:
            scheduler.finish(req, reason)
        sparsity = 1 - req.kv_read / req.kv_dense if req.kv_dense else None
        outbox.add(req, RequestOutput(req.rid, new, text, output_lps, input_lps, reason, req.prompt_len,
                                      req.cached_tokens, req.num_tokens - req.prompt_len, req.num_forced,
                                      req.cached_details, sparsity))


def _grammar_tokens(req: Request, token: int, scheduler) -> list[int]:
    """The tokens a constrained request gains from its sampled `token`: the token, then the
    tokens its grammar forces (jump-forward: they join the output at once, and the next step
    computes them in one extend). Empty if the grammar refuses the token (the request fails).
    Jump-forward is off for requests that want logprobs, so the output logprobs stay one entry."""
    grammar = req.grammar
    if not grammar.accept(token):
        scheduler.fail(req, f"constrained decoding failed: {grammar.error}")
        return []
    if token in req.stop_ids:
        return [token]
    forced = grammar.forced(req.token_limit - req.num_tokens - 1)
    if forced:
        req.drop_emits, req.num_pending = req.num_pending, 0  # samples in flight are now stale
    return [token, *forced]


_NONE: list = []  # shared empty list: deltas never mutate their lists
