"""Request: one sequence's state as the scheduler moves it through its life.

    WAITING --admit--> RUNNING (prefill chunks, then one decode token per step) --> FINISHED
       ^                  |
       +----retract-------+   (pages freed, what was computed kept in the radix cache)

A request's tokens are `prompt_ids + output_ids`; `num_computed` of them have their K/V in
the pool. Each step feeds the next chunk of uncomputed tokens; when a chunk reaches the
end of the tokens, the step samples the next output token. Decode is a chunk of one.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any, Callable

import numpy as np

from jaxserve.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for a request, sent to the engine's callback."""

    rid: str
    new_token_ids: list[int]
    output_logprobs: list[tuple[float, int, list]]  # (logprob, token, top [(lp, id)]) per new token
    input_logprobs: list[tuple[float | None, int, list]]  # per prompt token from logprob_start_len
    finished: bool
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    cached_tokens: int


@dataclasses.dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: np.ndarray  # [prompt_len] int32
    params: SamplingParams
    seed: int
    stop_ids: list[int]  # eos (unless ignore_eos) + stop_token_ids
    on_output: Callable[[RequestOutput], None]
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    session: Any = None  # the Session this turn belongs to, if any

    status: Status = Status.WAITING
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V is in the pool
    cache_pages: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))  # from the cache
    own_pages: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))  # private
    node: Any = None  # locked radix node of the matched prefix
    slot: int = 0  # sampler-state row while running
    cached_tokens: int = 0  # prompt tokens served from the radix cache at first admission
    admitted_once: bool = False
    finish_reason: dict[str, Any] | None = None
    input_logprobs: list = dataclasses.field(default_factory=list)  # delivered so far

    @property
    def tokens(self) -> np.ndarray:
        if not self.output_ids:
            return self.prompt_ids
        return np.concatenate([self.prompt_ids, np.asarray(self.output_ids, np.int32)])

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pages(self) -> np.ndarray:
        return np.concatenate([self.cache_pages, self.own_pages])

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0

    @property
    def prefill_only(self) -> bool:
        return self.params.max_new_tokens == 0

    def match_limit(self) -> int:
        """How many leading tokens may come from the radix cache.

        At least one token is always computed (its logits give the next token); input
        logprobs from `logprob_start_len` on need the hidden state of the token before.
        """
        limit = self.num_tokens - 1
        if self.wants_input_logprobs and self.next_input_logprob < len(self.prompt_ids):
            limit = min(limit, max(self.next_input_logprob - 1, 0))
        return limit

    @property
    def next_input_logprob(self) -> int:
        """The prompt index whose input logprob is owed next."""
        return self.logprob_start_len + len(self.input_logprobs)
