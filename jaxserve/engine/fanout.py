"""Fan-out: one validated call -> scheduler requests -> one stream of `(index, delta)`.

The one implementation of list inputs and of `n > 1`: branch `index` is prompt-major,
then branch. A prompt with `n > 1` is prefilled once first (`max_new_tokens: 0`) so that
its branches share its pages through the radix cache instead of computing it n times;
its branches report the prefill's cache hit as their `cached_tokens` (what the cache
held of the prompt before this call). Closing the stream aborts whatever has not
finished, so a client that goes away frees its pages at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

import numpy as np

from jaxserve.engine.inputs import GenerateInput
from jaxserve.sampling import SamplingParams
from jaxserve.scheduler import Request, RequestOutput
from jaxserve.scheduler.stops import StopChecker

_PREFILL = SamplingParams(max_new_tokens=0)


class _Sink:
    """Delivers one scheduler request's deltas into the call's queue, tagged by index."""

    def __init__(self, loop, queue: asyncio.Queue, index: int):
        self.loop, self.queue, self.index = loop, queue, index

    def put(self, out: RequestOutput) -> None:
        self.queue.put_nowait((self.index, out))


class Fanout:
    def __init__(self, engine, gen: GenerateInput):
        self.engine = engine
        self.gen = gen
        self.rids: dict[str, bool] = {}  # scheduler rid -> finished
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prefill_cached: dict[int, int] = {}

    async def stream(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        gen, loop = self.gen, asyncio.get_running_loop()
        session = gen.session
        conversation = None
        remaining = gen.num_branches
        first_index = np.cumsum([0] + [p.n for p in gen.params])  # prompt -> its first branch index
        try:
            for p, params in enumerate(gen.params):
                if params.n == 1:
                    self._submit(loop, p, 0, int(first_index[p]))
                else:
                    self._submit(loop, p, -1, -1 - p)
            while remaining:
                index, out = await self.queue.get()
                self.rids[out.rid] = self.rids.get(out.rid, False) or out.finished
                if index < 0:  # a prefill for the branches of prompt -1 - index
                    p = -1 - index
                    if out.finish_reason and out.finish_reason["type"] == "abort":
                        for j in range(gen.params[p].n):
                            remaining -= 1
                            yield int(first_index[p]) + j, dataclasses.replace(out, rid=gen.branch_rid(p, j))
                    elif out.finished:
                        self.prefill_cached[p] = out.cached_tokens
                        for j in range(gen.params[p].n):
                            self._submit(loop, p, j, int(first_index[p]) + j)
                    continue
                p = int(np.searchsorted(first_index, index, side="right")) - 1
                if p in self.prefill_cached:
                    out.cached_tokens = self.prefill_cached[p]
                if out.finished:
                    remaining -= 1
                    if session is not None and out.finish_reason["type"] != "abort":
                        conversation = self._conversation
                yield index, out
        finally:
            for rid, finished in self.rids.items():
                if not finished:
                    self.engine.scheduler.abort(rid)
            if session is not None:
                session.end_turn(conversation)

    def _submit(self, loop, p: int, branch: int, index: int) -> None:
        """Submit prompt `p`'s branch (-1: its prefill) to the scheduler as `index`."""
        gen, engine = self.gen, self.engine
        params = gen.params[p]
        if branch < 0:
            rid, params, seed, options = f"{gen.rids[p]}-prefill", _PREFILL, 0, None
        else:
            rid = gen.branch_rid(p, branch)
            if params.n > 1:
                params = dataclasses.replace(params, n=1)
            seed = engine.seed_for(params, branch)
            options = gen.logprobs
        prompt = gen.prompts[p]
        stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            stop_ids |= engine.tokenizer.eos_token_ids
        req = Request(rid, prompt, params, seed, frozenset(stop_ids), _Sink(loop, self.queue, index),
                      engine.context_length, session=gen.session if branch >= 0 else None)
        if options is not None:
            req.return_logprob, req.logprob_start_len = options.return_logprob, options.logprob_start_len
            req.top_logprobs_num = options.top_logprobs_num
        req.stop = StopChecker(engine.tokenizer, prompt, params, req.stop_ids, req.token_limit)
        grammar = gen.grammars[p] if branch >= 0 and gen.grammars else None
        if grammar is not None:  # each branch its own matcher; forced tokens have no logprobs to report
            req.grammar = grammar.start(jump_forward=not engine.args.disable_jump_forward and not req.return_logprob)
        self.rids[rid] = False
        if gen.session is not None:
            self._request = req
        engine.scheduler.submit(req)

    @property
    def _conversation(self) -> np.ndarray:
        """The session's conversation after its turn: the prompt and the output."""
        req = self._request
        return req.token_buf[: req.num_tokens].copy()
