"""The scheduler thread: continuous batching with chunked prefill over the radix cache.

Each iteration plans one ragged step (every running request's next token or prefill
chunk, then waiting requests as budget and memory allow), launches it, and handles the
results of the step before. With the overlap loop (the default) the host works on step
N+1 while the device runs step N: the next step's decode tokens are the device's own
sampled tokens (placeholders resolved inside the jitted program), and tokens reach the
host one step late. `overlap=False` keeps the synchronous loop: plan, run, handle.

The thread cannot wedge the engine. A failed step finishes only its own requests with an
error (if the failure took the donated KV pool with it, the pool is re-created, the cache
flushed and the other running requests recompute). If the thread dies anyway, the
scheduler is marked dead, every pending request ends with an error, and new requests
and `call`s are refused at once.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import queue
import threading
import time

import numpy as np

from jaxserve.constrained import allows_nothing, fill_masks
from jaxserve.errors import EngineUnavailableError
from jaxserve.memory import PageAllocator, RadixCache
from jaxserve.scheduler.admission import admit_waiting
from jaxserve.scheduler.batch import Row, StepPlan, owed_input_logprobs
from jaxserve.scheduler.batch_log import BatchLog
from jaxserve.scheduler.decode import plan_running
from jaxserve.scheduler.output import Outbox, StepResults, delta, process_rows
from jaxserve.scheduler.pages import PageBook
from jaxserve.scheduler.request import Request, Status
from jaxserve.scheduler.timing import StepTimes

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 60.0
_PREFETCH_WAIT_S = 0.002  # idle but for transfers of the hierarchical cache: how long the loop sleeps


@dataclasses.dataclass
class Step:
    """A launched step: its rows and the device handles of its results."""

    rows: list[Row]
    owed: list  # input logprobs: [(row, count)]
    fwd: object
    want_top: bool  # some emitting row wants top logprobs
    needs_mask: bool  # some emitting row has a grammar
    epoch: int  # device-state generation it ran on
    sampled: object = None
    input_lps: list = dataclasses.field(default_factory=list)


class Scheduler:
    def __init__(self, runner, cache: RadixCache, allocator: PageAllocator, *, chunk_size: int, max_step_tokens: int,
                 policy: str, overlap: bool = True, max_session_pages: int | None = None, hicache=None):
        self.runner = runner
        # Sparse attention: decode rows count the KV tokens they read against this many layers.
        self.sparse_layers = runner.model.config.num_layers if runner.sparse is not None else 0
        self.hicache = hicache  # memory.HiCache (host and storage tiers) or None
        self.book = PageBook(cache, allocator, runner,
                             max_session_pages=max_session_pages if max_session_pages is not None
                             else cache.total_pages // 2, hicache=hicache)
        self.chunk_size = chunk_size
        self.max_step_tokens = max_step_tokens
        self.policy = policy
        self.overlap = overlap
        self.running: dict[Request, None] = {}  # insertion-ordered set
        self.waiting: list[Request] = []  # arrival order
        self.free_rows = list(range(runner.max_running, 0, -1))
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox = Outbox()
        self.num_retractions = self.num_steps = 0
        self.times = StepTimes()
        self.batch_log = BatchLog()
        self.error: BaseException | None = None  # why the thread died
        self._alive = False
        self._gate = threading.Lock()  # orders submit / call against death
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: Step | None = None
        self._epoch = 0

    @property
    def cache(self) -> RadixCache:
        return self.book.cache

    @property
    def alive(self) -> bool:
        return self._alive

    # ---- called from other threads: everything goes through the inbox ----

    def submit(self, req: Request) -> None:
        self._post(("add", req))

    def abort(self, rid: str, reason: dict | None = None) -> None:
        if self._alive:
            self.inbox.put(("abort", (rid, reason)))

    def num_queued(self) -> int:
        """Requests not admitted yet (waiting, or posted and not taken in); read from any
        thread, so approximate by the few in hand-over."""
        return len(self.waiting) + self.inbox.qsize()

    def call(self, fn, timeout: float = CALL_TIMEOUT_S):
        """Run `fn()` on the scheduler thread between steps and return its result."""
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._post(("call", (fn, done)))
        try:
            result, error = done.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the scheduler did not answer within {timeout:.0f} s") from None
        if error is not None:
            raise error
        return result

    def _post(self, item) -> None:
        with self._gate:
            if not self._alive:
                raise EngineUnavailableError(self.unavailable_reason())
            self.inbox.put(item)

    def unavailable_reason(self) -> str:
        if self.error is not None:
            return f"the engine's scheduler died ({type(self.error).__name__}: {self.error}); restart the server"
        return "the engine is shut down"

    def start(self) -> None:
        self._alive = True
        self._thread = threading.Thread(target=self._main, name="jaxserve-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; every pending request ends with an abort."""
        self._stop.set()
        self.inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    # ---- the loop ----

    def _main(self) -> None:
        try:
            while not self._stop.is_set():
                idle = not self.running and self._inflight is None
                prefetching = idle and self.hicache is not None and (
                    self.hicache.busy or any(r.prefetch is not None for r in self.waiting))
                self._drain_inbox(block=idle and not self.waiting and not prefetching,
                                  timeout=_PREFETCH_WAIT_S if prefetching else None)
                self._iterate()
        except BaseException as exc:  # noqa: BLE001 - anything that escapes the guards ends the engine
            logger.critical("the scheduler thread died", exc_info=True)
            self.error = exc
        self._close()

    def _iterate(self) -> None:
        """One iteration: launch step N, handle step N-1, then (the seam for grammar masks,
        which need N-1's tokens) sample step N if that waited. Each part is guarded: a
        failure ends the requests of the step it belongs to."""
        prev, self._inflight = self._inflight, None
        if self.hicache is not None:
            self.hicache.poll()
        plan_rows: list[Row] = []
        step = self._guarded(lambda: self._launch(plan_rows), plan_rows)
        decode_rows = len(step.rows) if step is not None and step.fwd.layout.decode_only else 0
        if prev is not None and prev.epoch == self._epoch:  # else a failure reset the device under it
            self._guarded(lambda: self._handle(prev), prev.rows)
        if step is not None and step.epoch != self._epoch:
            step = None
        if step is not None and step.sampled is None:
            step = self._guarded(lambda: self._sample(step), step.rows)
        if step is not None and not self.overlap:
            self._guarded(lambda: self._handle(step), step.rows)
            step = None
        self._inflight = step
        self._deliver()
        self.times.end_iteration(decode_rows)

    def _guarded(self, fn, rows: list[Row]):
        """`fn()`, or None when it raised: then the requests of `rows` end with the error."""
        try:
            return fn()
        except Exception as exc:
            self._fail(rows, exc)
            return None

    def _launch(self, rows: list[Row]) -> Step | None:
        """Plan a step into `rows` and launch its forward (and its sampling, unless the
        sampling must wait for the previous step's results)."""
        start = time.perf_counter()
        plan = StepPlan(self.max_step_tokens, rows)
        plan_running(self, plan)
        admit_waiting(self, plan)
        if not rows:
            return None
        batch = plan.build(self.runner)
        self.batch_log.step(self, rows, batch.layout.decode_only)
        self.times.forward_launched()
        dispatch = time.perf_counter()
        fwd = self.runner.forward(batch)
        self.times.dispatched(dispatch)
        positions, targets, owed = owed_input_logprobs(plan.owed, rows)
        step = Step(rows, owed, fwd, plan.want_top, plan.needs_mask, self._epoch)
        if owed:
            lp_top = any(r.req.top_logprobs_num for r, _ in owed)
            size = self.runner.input_logprob_rows
            for at in range(0, len(positions), size):
                step.input_lps.append(self.runner.input_logprobs(
                    fwd, _pad(positions[at : at + size], size), _pad(targets[at : at + size], size), lp_top))
        self.num_steps += 1
        self.times.host(start)
        if self.overlap and not plan.needs_mask:
            self._sample(step)  # nothing to wait for: sample right behind the forward
        return step

    def _sample(self, step: Step) -> Step:
        start = time.perf_counter()
        step.sampled = self.runner.sample(step.fwd, self._masks(step) if step.needs_mask else None)
        self.times.dispatched(start)
        self.times.host(start)
        self.times.launched(step.sampled)
        return step

    def _masks(self, step: Step):
        """The step's grammar bitmask (None when no sampling row has a grammar); a request
        whose grammar allows nothing, or broke, ends with an error instead of sampling."""
        rows = step.rows
        grammars = [(i, r.req.grammar) for i, r in enumerate(rows)
                    if r.emit and r.req.grammar is not None and r.req.status is not Status.FINISHED]
        if not grammars:
            return None
        mask = fill_masks(grammars, step.fwd.layout.max_seqs, self.runner.vocab)
        for i, grammar in grammars:
            if grammar.error is not None or allows_nothing(mask, i):
                self.fail(rows[i].req, f"constrained decoding failed: {grammar.error or 'the grammar allows no token here'}")
        return mask

    def _handle(self, step: Step) -> None:
        """Fetch a step's results and fold them into its requests."""
        wait = time.perf_counter()
        results = StepResults(step.sampled, step.input_lps, step.want_top)
        self.times.waited(time.perf_counter() - wait)
        start = time.perf_counter()
        process_rows(step.rows, results, step.owed, self, self.outbox)
        self.times.host(start)

    def _deliver(self) -> None:
        start = time.perf_counter()
        for rid in self.outbox.flush():
            logger.warning("request %s lost its consumer; aborting it", rid)
            self._abort(rid, None)
        self.times.host(start)

    # ---- failures ----

    def _fail(self, rows: list[Row], exc: Exception) -> None:
        """End the requests of a failed step with an error; if the device state went with
        it, re-create it and let every other running request recompute."""
        logger.error("a step failed; ending its %d requests", len(rows), exc_info=exc)
        for row in rows:
            row.req.inflight = max(row.req.inflight - 1, 0)
            if row.req.status is not Status.FINISHED:
                self.fail(row.req, f"internal error: {type(exc).__name__}: {exc}")
        self.cache.flush()  # entries the failed step was writing may be in the cache
        if self.runner.lost_state():
            logger.error("the failed step lost the KV pool; re-creating it and recomputing running requests")
            self._inflight = None
            self._epoch += 1
            for req in list(self.running):
                self.retract(req, how="drop")
            for req in self.waiting:
                req.inflight = req.num_pending = req.drop_emits = 0
            self.book.drop_all_pins()
            self.cache.flush()
            self.runner.reset()

    def _close(self) -> None:
        """The loop ended (stop or death): refuse new work and end every pending request."""
        with self._gate:
            self._alive = False
        reason = {"type": "abort", "message": self.unavailable_reason()}
        for req in list(self.running) + list(self.waiting):
            try:
                self.finish(req, reason, how="drop" if self.error else "cache")
            except Exception:  # noqa: BLE001 - accounting may be broken if we died; still end them
                req.status = Status.FINISHED
            self.outbox.add(req, delta(req, reason=reason))
        self.running.clear()
        self.waiting.clear()
        while True:
            try:
                kind, arg = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                arg.status = Status.FINISHED
                self.outbox.add(arg, delta(arg, reason=reason))
            elif kind == "call":
                arg[1].put((None, EngineUnavailableError(self.unavailable_reason())))
        self.outbox.flush()
        if self.hicache is not None:
            self.hicache.close()

    # ---- the inbox ----

    def _drain_inbox(self, block: bool, timeout: float | None = None) -> None:
        """Take everything posted; with `block`, wait for the first item; with `timeout`
        (idle, only waiting requests: e.g. their storage prefetch runs), wait that long."""
        try:
            item = self.inbox.get() if block else self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = item
            if kind == "add":
                bisect.insort(self.waiting, arg, key=lambda r: r.arrival)
                if self.hicache is not None:
                    self._start_prefetch(arg)
            elif kind == "abort":
                self._abort(*arg)
            elif kind == "call":
                fn, done = arg
                try:
                    done.put((fn(), None))
                except Exception as exc:  # noqa: BLE001 - the caller gets it
                    done.put((None, exc))
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    # ---- request life ----

    def _start_prefetch(self, req: Request) -> None:
        try:
            self.hicache.on_arrival(req)
        except Exception:  # noqa: BLE001 - the storage tier is an optimization: serve without it
            logger.exception("KV storage prefetch for %s failed to start", req.rid)

    def finish(self, req: Request, reason: dict, how: str = "finish") -> None:
        """End `req` (the caller delivers its last output); its pages go back per `how`."""
        if req.status is Status.RUNNING:
            self._release(req, how)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
            if self.hicache is not None:
                self.hicache.cancel(req)
        req.status, req.finish_reason = Status.FINISHED, reason

    def fail(self, req: Request, message: str) -> None:
        """End `req` with an error and tell its consumer; its KV is not trusted."""
        reason = {"type": "abort", "message": message}
        self.finish(req, reason, how="drop")
        self.outbox.add(req, delta(req, reason=reason))

    def retract(self, req: Request, how: str = "cache") -> None:
        """Back to waiting: pages freed (the computed prefix kept in the cache), recomputed later."""
        self._release(req, how)
        req.status = Status.WAITING
        if how == "drop":
            req.inflight = req.num_pending = req.drop_emits = 0
        bisect.insort(self.waiting, req, key=lambda r: r.arrival)
        self.num_retractions += 1
        logger.info("retracted %s (%d tokens) to free KV pages", req.rid, req.num_tokens)

    def _release(self, req: Request, how: str) -> None:
        self.book.release(req, how)
        del self.running[req]
        self.free_rows.append(req.row)
        req.row = 0

    def _abort(self, rid: str, reason: dict | None) -> None:
        reason = reason or {"type": "abort", "message": "aborted by request"}
        for req in [r for r in self.running if r.rid == rid] + [r for r in self.waiting if r.rid == rid]:
            self.finish(req, reason, how="cache")
            self.outbox.add(req, delta(req, text=req.stop.finish_text(), reason=reason))

    # ---- sessions and inspection (scheduler thread, e.g. through `call`) ----

    def close_session(self, session) -> None:
        session.closed = True
        self.book.unpin(session)

    def stats(self) -> dict:
        if self.hicache is not None:  # settle finished copies (all of them when idle)
            self.hicache.poll(wait=not self.running and not self.waiting)
        cache = self.cache
        return {
            "num_running_reqs": len(self.running), "num_waiting_reqs": len(self.waiting),
            "free_pages": cache.free_pages, "evictable_pages": cache.evictable_pages,
            "locked_pages": cache.locked_pages, "total_pages": cache.total_pages,
            # held by running requests outside the tree (their unfinished tails)
            "private_pages": cache.total_pages - cache.free_pages - cache.evictable_pages - cache.locked_pages,
            "session_pinned_pages": self.book.pinned_pages,
            "cache_hit_rate": cache.hit_rate, "num_retractions": self.num_retractions,
            "num_steps": self.num_steps, **self.times.summary(),
            **(self.hicache.stats() if self.hicache is not None else {}),
        }


def _pad(a, size: int):
    out = np.zeros(size, np.int32)
    out[: len(a)] = a
    return out
