"""Request: one sequence's state as the scheduler moves it through its life.

    WAITING --admit--> RUNNING (prefill chunks, then one decode token per step) --> FINISHED
       ^                  |
       +----retract-------+   (pages freed, what was computed kept in the radix cache)

A request's tokens live in one preallocated buffer, `prompt + outputs`; `num_tokens` of
them are known on the host. With the overlap loop a step's sampled token reaches the
host one step late: until then it is *pending* (`num_pending`), and the next step feeds
it from the device (a placeholder in the input ids). `num_computed` counts the tokens
whose K/V is written, or being written by a launched step. Pages live in one buffer
too: the first `num_cache_pages` come from the radix cache (locked through `node`), the
rest up to `num_pages` are the request's own.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any, Protocol

import numpy as np

from jaxserve.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(slots=True)
class RequestOutput:
    """What a request gained since its last output: a delta, so delivery stays linear."""

    rid: str
    token_ids: list[int]  # new output tokens
    text: str  # new text; it never takes back what was sent (stop strings are held back)
    output_logprobs: list[tuple[float, int, list]]  # (logprob, token, top [(lp, id)]) per new token
    input_logprobs: list[tuple[float | None, int, list]]  # new prompt-token entries
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int  # running total
    forced_tokens: int = 0  # running total of output tokens a grammar forced (jump-forward)
    cached_tokens_details: dict[str, int] | None = None  # hierarchical cache: {device, host, storage}
    attention_sparsity_ratio: float | None = None  # sparse attention: KV tokens skipped / a dense decode's

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Sink(Protocol):
    """Where a request's outputs go. The scheduler batches `put` calls per event loop."""

    loop: Any  # the asyncio loop that `put` runs on

    def put(self, out: RequestOutput) -> None: ...


@dataclasses.dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: np.ndarray  # [prompt_len] int32
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]  # eos (unless ignore_eos) + stop_token_ids
    sink: Sink
    max_len: int  # the context length: tokens never exceed it
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    session: Any = None  # the Session this turn belongs to, if any
    arrival: float = dataclasses.field(default_factory=time.monotonic)

    status: Status = Status.WAITING
    num_pending: int = 0  # sampled on the device, not yet read on the host
    inflight: int = 0  # launched steps whose results are not processed yet
    num_computed: int = 0  # tokens whose K/V is in the pool or being written
    node: Any = None  # locked radix node of the cached prefix
    num_cache_pages: int = 0  # pages[:num_cache_pages] belong to the radix cache
    num_pages: int = 0
    row: int = 0  # device state row while running (0: none)
    cached_tokens: int = 0  # prompt tokens served from the radix cache at first admission
    admitted_once: bool = False
    finish_reason: dict[str, Any] | None = None
    num_input_logprobs: int = 0  # prompt-token logprob entries delivered
    stop: Any = None  # the StopChecker deciding text stops (output.py)
    grammar: Any = None  # a constrained.Grammar: masks what it samples, may force tokens
    num_forced: int = 0  # output tokens the grammar forced (appended without sampling)
    drop_emits: int = 0  # launched samples made stale by a jump-forward: their tokens are dropped
    # The hierarchical cache: a storage read in flight, prompt tokens it added to the
    # tree, tokens the last admission loaded from the host, and the first admission's
    # hit per tier ({device, host, storage}).
    prefetch: Any = None
    storage_tokens: int = 0
    loaded_tokens: int = 0
    cached_details: dict[str, int] | None = None
    # Sparse attention: KV tokens its decode steps read, and would have read densely (all layers).
    kv_read: int = 0
    kv_dense: int = 0

    def __post_init__(self) -> None:
        # Plain attributes for what every step reads: properties cost more than the work.
        self.prompt_len = prompt_len = len(self.prompt_ids)
        # Tokens after which nothing more is sampled: max_new_tokens, or the context.
        self.token_limit = min(prompt_len + self.params.max_new_tokens, self.max_len)
        self.token_buf = np.empty(max(self.token_limit, prompt_len), np.int32)  # [token_limit]
        self.token_buf[:prompt_len] = self.prompt_ids
        self.num_tokens = prompt_len
        self.pages = np.zeros(0, np.int32)  # grown by `grow_pages`; [:num_pages] live
        self.prefill_only = self.params.max_new_tokens == 0
        self.plan_stamp = -1  # the last step plan this request joined

    # ---- tokens ----

    @property
    def tokens(self) -> np.ndarray:
        """Known tokens, a view (no copy)."""
        return self.token_buf[: self.num_tokens]

    @property
    def output_ids(self) -> np.ndarray:
        return self.token_buf[self.prompt_len : self.num_tokens]

    @property
    def num_outputs(self) -> int:
        return self.num_tokens - self.prompt_len

    def append(self, token: int) -> None:
        self.token_buf[self.num_tokens] = token
        self.num_tokens += 1

    # ---- pages ----

    @property
    def live_pages(self) -> np.ndarray:
        return self.pages[: self.num_pages]

    def grow_pages(self, new: np.ndarray) -> None:
        """Append pages; the buffer doubles, so growing is amortised O(1) per page."""
        end = self.num_pages + len(new)
        if end > len(self.pages):
            grown = np.zeros(max(end, 2 * len(self.pages), 8), np.int32)
            grown[: self.num_pages] = self.pages[: self.num_pages]
            self.pages = grown
        self.pages[self.num_pages : end] = new
        self.num_pages = end

    # ---- what the request still wants ----

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0

    @property
    def next_input_logprob(self) -> int:
        """The prompt index whose input logprob is owed next."""
        return self.logprob_start_len + self.num_input_logprobs

    @property
    def done_sampling(self) -> bool:
        """Every token this request may sample is sampled (some may still be pending)."""
        return self.num_tokens + self.num_pending >= self.token_limit

    def match_limit(self) -> int:
        """How many leading tokens may come from the radix cache.

        At least one token is always computed (its logits give the next token); input
        logprobs from `logprob_start_len` on need the hidden state of the token before.
        """
        limit = self.num_tokens - 1
        if self.wants_input_logprobs and self.next_input_logprob < self.prompt_len:
            limit = min(limit, max(self.next_input_logprob - 1, 0))
        return limit
