"""StepPlan: the rows one step runs, and the host arrays built from them.

The scheduler adds rows to a plan (a decode token or a prefill chunk per request) and the
plan becomes the runner's `StepBatch` in one pass over its rows: work per step follows
the number of rows and new tokens, never the length of the sequences (a decode token
whose value is still on the device is fed as `-row`, the row's last sampled token).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from jaxserve.runner import Layout, StepBatch
from jaxserve.scheduler.request import Request

_PAD_ROW = 0


@dataclasses.dataclass(slots=True)
class Row:
    req: Request
    start: int  # position of the chunk's first token
    chunk: int  # tokens fed this step
    emit: bool  # this step samples the request's next token
    logprobs_from: int  # prompt index of the first input logprob this row computes
    logprobs_to: int  # ... and one past the last


class StepPlan:
    _ids = itertools.count()

    def __init__(self, budget: int, rows: list[Row] | None = None):
        self.budget = budget  # tokens still free in this step
        self.rows: list[Row] = [] if rows is None else rows
        self.id = next(self._ids)  # stamped on the planned requests: membership in O(1)
        self.page_updates: list[tuple[int, int, np.ndarray]] = []  # (row, first column, pages)
        self.owed: list[Row] = []  # rows that compute input logprobs
        self.want_top = False  # some sampling row asked for top logprobs
        # A step that samples for a request with a grammar needs the previous step's tokens
        # (to fill its mask on the host): it samples only after those are handled.
        self.needs_mask = False

    def add(self, req: Request, chunk: int, new_pages: np.ndarray | None = None) -> Row:
        """Plan `chunk` tokens of `req` from its `num_computed`, which advances past them."""
        start = req.num_computed
        end = start + chunk
        if new_pages is not None and len(new_pages):
            self.page_updates.append((req.row, req.num_pages - len(new_pages), new_pages))
        emit = end == req.num_tokens + req.num_pending and not req.prefill_only
        lp_from = lp_to = 0
        if req.return_logprob:
            if req.wants_input_logprobs:
                lp_from = max(req.next_input_logprob, start + 1)
                lp_to = max(lp_from, min(end + 1, req.prompt_len))
            self.want_top |= emit and req.top_logprobs_num > 0
        if emit and req.grammar is not None:
            self.needs_mask = True
        row = Row(req, start, chunk, emit, lp_from, lp_to)
        self.rows.append(row)
        if lp_to > lp_from:
            self.owed.append(row)
        req.plan_stamp = self.id
        self.budget -= chunk
        req.num_computed = end
        req.inflight += 1
        if emit:
            req.num_pending += 1
        return row

    def __contains__(self, req: Request) -> bool:
        return req.plan_stamp == self.id

    def build(self, runner) -> StepBatch:
        """The step's upload, padded to its bucket: one pass over the rows into lists, one
        numpy copy per field."""
        rows = self.rows
        cu, kv_lens, seq_rows, emit, placeholders = [], [], [], [], []
        t = 0
        for r in rows:
            req = r.req
            cu.append(t)
            kv_lens.append(r.start + r.chunk)
            seq_rows.append(req.row)
            emit.append(r.emit)
            if r.start >= req.num_tokens:  # the token sampled last step, still on the device
                placeholders.append(t)
            t += r.chunk
        num_tokens = runner.bucket(t, decode=t == len(rows))
        max_seqs = runner.max_seqs(num_tokens)
        decode_only = max_seqs == num_tokens and t == len(rows)  # the decode path needs T == S
        batch = StepBatch(Layout(num_tokens, max_seqs, runner.max_updates(num_tokens), decode_only))
        n = len(rows)
        batch.cu_q_lens[:n], batch.cu_q_lens[n:] = cu, t
        batch.kv_lens[:n], batch.rows[:n], batch.emit[:n] = kv_lens, seq_rows, emit
        batch.num_seqs[0] = n
        ids = batch.input_ids
        if len(placeholders) == n == t:  # all decode from device tokens: no host tokens at all
            ids[:n] = np.negative(batch.rows[:n])
        else:
            for r, at in zip(rows, cu):
                if r.start < r.req.num_tokens:
                    ids[at : at + r.chunk] = r.req.token_buf[r.start : r.start + r.chunk]
                else:
                    ids[at] = -r.req.row
        u = 0
        for row, col, pages in self.page_updates:
            k = len(pages)
            batch.page_rows[u : u + k] = row
            batch.page_cols[u : u + k] = np.arange(col, col + k)
            batch.page_vals[u : u + k] = pages
            u += k
        return batch


def owed_input_logprobs(owed: list[Row], rows: list[Row]) -> tuple[np.ndarray, np.ndarray, list[tuple[Row, int]]]:
    """The hidden-state positions and target tokens of every input logprob a step owes.

    The logprob of prompt token i comes from the hidden state of token i - 1. Returns
    (positions [N], targets [N], [(row, how many)] in order).
    """
    if not owed:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), []
    offsets, t = {}, 0
    for r in rows:
        offsets[id(r)] = t
        t += r.chunk
    positions, targets, counts = [], [], []
    for r in owed:
        idx = np.arange(r.logprobs_from, r.logprobs_to)
        positions.append(offsets[id(r)] + idx - 1 - r.start)
        targets.append(r.req.prompt_ids[idx])
        counts.append((r, len(idx)))
    return np.concatenate(positions).astype(np.int32), np.concatenate(targets).astype(np.int32), counts
