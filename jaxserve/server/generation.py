"""One HTTP request's engine work: validate every prompt up front, stream every branch, merge.

The server drives every engine request in streaming mode, also for clients that did not
ask to stream, so time-to-first-token and inter-token latency are measured for all of
them and a client that goes away aborts its work at once. A prompt with `n > 1` is
prefilled once first (`max_new_tokens: 0`), so that its branches share the prompt's pages
through the radix cache instead of computing it n times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, AsyncIterator

from jaxserve.errors import InvalidRequestError
from jaxserve.sampling import SamplingParams
from jaxserve.server.metrics import RequestTracker, ServerMetrics

__all__ = ["Generation", "LogprobOptions", "Prompt"]


@dataclasses.dataclass
class LogprobOptions:
    """The logprob fields of `/generate`, shared by every prompt of one request."""

    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False


@dataclasses.dataclass
class Prompt:
    input_ids: list[int]
    sampling_params: dict[str, Any]  # SGLang's sampling_params; `n` branches share this prompt
    rid: str


@dataclasses.dataclass
class _Branch:
    index: int  # position in the response: prompt-major, then branch
    prompt: int
    rid: str
    stream: AsyncIterator[dict]


class Generation:
    """The engine requests behind one HTTP request, merged into one stream of `(index, output)`.

    `start()` validates everything and opens the engine streams without submitting
    anything, so a bad prompt in a batch fails the whole request before any work starts.
    """

    def __init__(self, engine, metrics: ServerMetrics, prompts: list[Prompt], options: LogprobOptions,
                 session_params: dict | None = None):
        self.engine = engine
        self.metrics = metrics
        self.prompts = prompts
        self.options = options
        self.session_params = session_params
        self.branches: list[_Branch] = []
        self.prefill_cached: list[int | None] = [None] * len(prompts)  # cache hits seen by n > 1 prefills
        self._tasks: list[asyncio.Task] = []
        self._finished: set[int] = set()
        self._aborted = False
        self.created = time.monotonic()

    @property
    def user_rids(self) -> list[str]:
        return [p.rid for p in self.prompts]

    async def start(self) -> None:
        """Validate every prompt and open its branches; raises `InvalidRequestError`."""
        if self.session_params is not None and (len(self.prompts) > 1 or _n(self.prompts[0]) > 1):
            raise InvalidRequestError("a request in a session takes one prompt with n=1")
        try:
            for i, prompt in enumerate(self.prompts):
                await self._open(i, prompt)
        except BaseException:
            await self._close_streams()
            raise

    async def _open(self, i: int, prompt: Prompt) -> None:
        raw = prompt.sampling_params
        params = SamplingParams.from_dict(raw)
        params.validate(self.engine.model.config.vocab_size)
        total = len(prompt.input_ids) + params.max_new_tokens
        if self.session_params is None and total > self.engine.context_length:
            raise InvalidRequestError(
                f"the prompt has {len(prompt.input_ids)} tokens and max_new_tokens is {params.max_new_tokens}: "
                f"{total} tokens exceed the context length {self.engine.context_length}; "
                "lower max_new_tokens or shorten the prompt")
        extra = {} if self.session_params is None else {"session_params": self.session_params}
        for j in range(params.n):
            branch = {**raw, "n": 1}
            if params.n > 1 and params.sampling_seed is not None:
                branch["sampling_seed"] = params.sampling_seed + j  # distinct but reproducible branches
            rid = prompt.rid if params.n == 1 else f"{prompt.rid}-{j}"
            stream = await self.engine.async_generate(
                input_ids=prompt.input_ids, sampling_params=branch, rid=rid, stream=True,
                **dataclasses.asdict(self.options), **extra)
            self.branches.append(_Branch(len(self.branches), i, rid, stream))

    async def events(self) -> AsyncIterator[tuple[int, dict]]:
        """Cumulative outputs of every branch as they come; each branch ends with a finished one."""
        queue: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._run_prompt(i, queue)) for i in range(len(self.prompts))]
        remaining = len(self.branches)
        try:
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            self.close()

    async def results(self) -> list[dict]:
        """The final output of every branch, in index order."""
        final: dict[int, dict] = {}
        async for index, out in self.events():
            final[index] = out
        return [final[b.index] for b in self.branches]

    def abort(self) -> None:
        """Abort whatever has not finished; each branch still ends with an `abort` output."""
        self._aborted = True
        for branch in self.branches:
            if branch.index not in self._finished:
                self.engine.abort(branch.rid)
        for i, prompt in enumerate(self.prompts):
            if len(self._branches_of(i)) > 1:
                self.engine.abort(_prefill_rid(prompt.rid))

    def close(self) -> None:
        """Abort and stop: nobody reads the outputs any more (idempotent)."""
        self.abort()
        for task in self._tasks:
            task.cancel()

    async def _run_prompt(self, i: int, queue: asyncio.Queue) -> None:
        branches = self._branches_of(i)
        try:
            if len(branches) > 1 and not self._aborted:
                prompt = self.prompts[i]
                out = await self.engine.async_generate(input_ids=prompt.input_ids, rid=_prefill_rid(prompt.rid),
                                                       sampling_params={"max_new_tokens": 0})
                self.prefill_cached[i] = out["meta_info"]["cached_tokens"]
            await asyncio.gather(*(self._pump(b, queue) for b in branches))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surfaces in events(), which aborts the rest
            queue.put_nowait((-1, exc))

    def _branches_of(self, prompt: int) -> list[_Branch]:
        return [b for b in self.branches if b.prompt == prompt]

    async def _pump(self, branch: _Branch, queue: asyncio.Queue) -> None:
        tracker: RequestTracker = self.metrics.track(self.created)  # TTFT includes an n > 1 prefill
        if self._aborted:  # aborted before this branch started: abort right after its submit
            asyncio.get_running_loop().call_soon(self.engine.abort, branch.rid)
        try:
            async for out in branch.stream:
                tracker.update(out)
                if out["meta_info"]["finish_reason"] is not None:
                    self._finished.add(branch.index)
                queue.put_nowait((branch.index, out))
        finally:
            tracker.cancelled()
            await branch.stream.aclose()  # type: ignore[attr-defined]
        queue.put_nowait((branch.index, None))

    async def _close_streams(self) -> None:
        for branch in self.branches:
            await branch.stream.aclose()  # type: ignore[attr-defined]


def _n(prompt: Prompt) -> int:
    n = prompt.sampling_params.get("n")
    return n if isinstance(n, int) else 1


def _prefill_rid(rid: str) -> str:
    return f"{rid}-prefill"
