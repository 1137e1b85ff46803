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

    def add(self, req: Request, chunk: int, new_pages: np.ndarray | None = None) -> Row:
        """Plan `chunk` tokens of `req` from its `num_computed`, which advances past them."""
        start = req.num_computed
        end = start + chunk
        if new_pages is not None and len(new_pages):
            self.page_updates.append((req.row, req.num_pages - len(new_pages), new_pages))
        emit = end == req.num_tokens + req.num_pending and not req.prefill_only
        lp_from = lp_to = 0
        if req.wants_input_logprobs:
            lp_from = max(req.next_input_logprob, start + 1)
            lp_to = max(lp_from, min(end + 1, req.prompt_len))
        row = Row(req, start, chunk, emit, lp_from, lp_to)
        self.rows.append(row)
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
        """The step's upload, padded to its bucket."""
        rows = self.rows
        total = sum(r.chunk for r in rows)
        num_tokens = runner.bucket(total)
        max_seqs = runner.max_seqs(num_tokens)
        decode_only = max_seqs == num_tokens and total == len(rows)  # the decode path needs T == S
        batch = StepBatch(Layout(num_tokens, max_seqs, runner.max_updates(num_tokens), decode_only))
        ids, cu, kv_lens, seq_rows, emit = batch.input_ids, batch.cu_q_lens, batch.kv_lens, batch.rows, batch.emit
        t = 0
        for s, r in enumerate(rows):
            req, n = r.req, r.chunk
            cu[s] = t
            if r.start < req.num_tokens:
                ids[t : t + n] = req.token_buf[r.start : r.start + n]
            else:  # the token sampled last step, still on the device
                ids[t] = -req.row
            kv_lens[s] = r.start + n
            seq_rows[s] = req.row
            emit[s] = r.emit
            t += n
        cu[len(rows) :] = t
        batch.num_seqs[0] = len(rows)
        u = 0
        for row, col, pages in self.page_updates:
            k = len(pages)
            batch.page_rows[u : u + k] = row
            batch.page_cols[u : u + k] = np.arange(col, col + k)
            batch.page_vals[u : u + k] = pages
            u += k
        return batch


def owed_input_logprobs(rows: list[Row]) -> tuple[np.ndarray, np.ndarray, list[tuple[Row, int]]]:
    """The hidden-state positions and target tokens of every input logprob a step owes.

    The logprob of prompt token i comes from the hidden state of token i - 1. Returns
    (positions [N], targets [N], [(row, how many)] in order).
    """
    positions, targets, counts = [], [], []
    t = 0
    for r in rows:
        if r.logprobs_to > r.logprobs_from:
            idx = np.arange(r.logprobs_from, r.logprobs_to)
            positions.append(t + idx - 1 - r.start)
            targets.append(r.req.prompt_ids[idx])
            counts.append((r, len(idx)))
        t += r.chunk
    if not counts:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), []
    return np.concatenate(positions).astype(np.int32), np.concatenate(targets).astype(np.int32), counts
