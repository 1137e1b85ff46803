"""The scheduler thread: continuous batching with chunked prefill over the radix cache.

Each iteration builds one ragged batch: first every running request (a decode token, or
the next chunk of its prefill), then newly admitted requests while the step's token
budget and `max_running_requests` allow. Pages come from the allocator, evicting unlocked
radix-cache pages when the free list runs dry; when even that fails, the requests with
the least progress are retracted (their computed prefix goes to the radix cache, their
private pages are freed, they wait again) instead of failing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np

from jaxserve.memory import NoRadixCache, PageAllocator, RadixCache
from jaxserve.models import ForwardBatch
from jaxserve.runner import ModelRunner, StepInput
from jaxserve.sampling import SamplingBatch
from jaxserve.scheduler.policy import order_waiting
from jaxserve.scheduler.request import Request, RequestOutput, Status

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, runner: ModelRunner, cache: RadixCache, allocator: PageAllocator, *,
                 chunk_size: int, policy: str, context_length: int):
        self.runner = runner
        self.cache = cache
        self.allocator = allocator
        self.page_size = cache.page_size
        self.chunk_size = chunk_size
        self.policy = policy
        self.context_length = context_length
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.free_slots = list(range(runner.max_running, 0, -1))
        self.inbox: queue.Queue = queue.Queue()
        self.num_retractions = 0
        self.num_steps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- called from other threads: everything goes through the inbox ----

    def submit(self, req: Request) -> None:
        self.inbox.put(("add", req))

    def abort(self, rid: str, reason: dict | None = None) -> None:
        self.inbox.put(("abort", (rid, reason)))

    def call(self, fn):
        """Run `fn()` on the scheduler thread between steps and return its result."""
        done: queue.Queue = queue.Queue()
        self.inbox.put(("call", (fn, done)))
        result, error = done.get()
        if error is not None:
            raise error
        return result

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="jaxserve-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the loop ----

    def _loop(self) -> None:
        while not self._stop.is_set():
            idle = not self.running and not self.waiting
            self._drain_inbox(block=idle)
            try:
                self.step_once()
            except Exception as exc:  # a failed step must not kill the engine
                logger.exception("step failed; aborting its requests")
                for req in list(self.running):
                    self._finish(req, {"type": "abort", "message": f"internal error: {exc}"})

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = item
            if kind == "add":
                self.waiting.append(arg)
            elif kind == "abort":
                self._abort(*arg)
            elif kind == "call":
                fn, done = arg
                try:
                    done.put((fn(), None))
                except Exception as exc:
                    done.put((None, exc))
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def step_once(self) -> bool:
        """Schedule and run one step; False when there was nothing to do."""
        rows = self._schedule()
        if not rows:
            return False
        self._run(rows)
        self.num_steps += 1
        return True

    # ---- building a batch ----

    def _schedule(self) -> list[tuple[Request, int]]:
        budget = self.runner.buckets[-1]
        rows: list[tuple[Request, int]] = []
        for req in list(self.running):
            if req.status is not Status.RUNNING or budget == 0:
                continue
            chunk = min(req.num_tokens - req.num_computed, self.chunk_size, budget)
            if not self._ensure_pages(req, chunk, scheduled=[r for r, _ in rows]):
                continue  # req itself was retracted
            rows.append((req, chunk))
            budget -= chunk
        for req in order_waiting(self.waiting, self.policy, self.cache):
            if budget == 0 or len(self.running) >= self.runner.max_running:
                break
            chunk = self._admit(req, budget)
            if chunk == 0:
                break  # head-of-line: wait until memory frees up
            rows.append((req, chunk))
            budget -= chunk
        return rows

    def _admit(self, req: Request, budget: int) -> int:
        pages, node = self.cache.match_prefix(req.tokens[: req.match_limit()])
        self.cache.lock(node)
        num_matched = len(pages) * self.page_size
        chunk = min(req.num_tokens - num_matched, self.chunk_size, budget)
        # Reserve the rest of the prompt plus a page to grow, and a page of headroom per running request.
        need = -(-(req.num_tokens + 1) // self.page_size) - len(pages)
        available = self.cache.free_pages + self.cache.evictable_pages
        chunk_pages = -(-(num_matched + chunk) // self.page_size) - len(pages)
        if available < need + len(self.running) or not self._reserve(chunk_pages):
            self.cache.unlock(node)
            return 0
        req.node, req.cache_pages = node, pages
        req.own_pages = self.allocator.alloc(chunk_pages)
        req.num_computed = num_matched
        if not req.admitted_once:
            req.cached_tokens = num_matched
            req.admitted_once = True
        req.slot = self.free_slots.pop()
        self.runner.set_slot(req.slot, req.tokens[: len(req.prompt_ids)], req.params.logit_bias)
        req.status = Status.RUNNING
        self.waiting.remove(req)
        self.running.append(req)
        return chunk

    def _reserve(self, num_pages: int) -> bool:
        """Make `num_pages` free, evicting unlocked cache pages if needed."""
        short = num_pages - self.allocator.num_free
        if short > 0:
            self.cache.evict(short)
        return self.allocator.num_free >= num_pages

    def _ensure_pages(self, req: Request, chunk: int, scheduled: list[Request]) -> bool:
        need = -(-(req.num_computed + chunk) // self.page_size) - len(req.cache_pages) - len(req.own_pages)
        while not self._reserve(need):
            victims = [r for r in self.running if r is not req and r not in scheduled]
            victim = min(victims, key=lambda r: (len(r.output_ids), -r.arrival), default=req)
            self._retract(victim)
            if victim is req:
                return False
        req.own_pages = np.concatenate([req.own_pages, self.allocator.alloc(need)]) if need > 0 else req.own_pages
        return True

    # ---- running a batch and handling its outputs ----

    def _run(self, rows: list[tuple[Request, int]]) -> None:
        runner = self.runner
        seqs, emit = [], []
        for req, chunk in rows:
            start = req.num_computed
            seqs.append((req.tokens[start : start + chunk], start, req.pages))
            emit.append(start + chunk == req.num_tokens and not req.prefill_only)
        num_tokens = runner.bucket(sum(chunk for _, chunk in rows))
        max_seqs = runner.max_seqs(num_tokens)
        batch = ForwardBatch.build(seqs, self.page_size, num_tokens, max_seqs, runner.pages_per_seq)
        sample_index = np.zeros(max_seqs, np.int32)
        sample_index[: len(rows)] = batch.cu_q_lens[1 : len(rows) + 1] - 1
        slots = np.zeros(max_seqs, np.int32)
        slots[: len(rows)] = [req.slot for req, _ in rows]
        emit_mask = np.zeros(max_seqs, bool)
        emit_mask[: len(rows)] = emit
        sampling_rows = [(req.params, req.seed, len(req.output_ids), req.stop_ids) for req, _ in rows]
        step = StepInput(
            batch, sample_index, emit_mask, slots,
            SamplingBatch.build(sampling_rows, pad_to=max_seqs, max_stop_ids=runner.max_stop_ids),
            want_top=any(req.top_logprobs_num > 0 for req, _ in rows))
        out = runner.step(step)
        input_lps = self._input_logprobs(rows, batch, out.hidden)
        for i, (req, chunk) in enumerate(rows):
            req.num_computed += chunk
            if not emit[i]:
                self._cache_prefill_progress(req)
            new_tokens, output_lps = [], []
            if emit[i]:
                token = int(out.tokens[i])
                top = list(zip(out.top_logprobs[i, : req.top_logprobs_num].tolist(),
                               out.top_ids[i, : req.top_logprobs_num].tolist()))
                new_tokens, output_lps = [token], [(float(out.logprobs[i]), token, top)]
                req.output_ids.append(token)
            reason = self._finish_reason(req, new_tokens)
            self._emit(req, new_tokens, output_lps, input_lps.get(req.rid, []), reason)

    def _input_logprobs(self, rows, batch: ForwardBatch, hidden) -> dict[str, list]:
        """Input-token logprobs owed by rows whose chunk covers positions >= logprob_start_len.

        The logprob of prompt token i comes from the hidden state at position i - 1; the
        first prompt token has none (null), as in SGLang.
        """
        result: dict[str, list] = {}
        owed: list[tuple[Request, int, int]] = []  # (req, prompt index i, batch index of position i - 1)
        for s, (req, chunk) in enumerate(rows):
            if not req.wants_input_logprobs:
                continue
            start, prompt_len = req.num_computed, len(req.prompt_ids)
            if req.next_input_logprob == 0:
                req.input_logprobs.append((None, int(req.prompt_ids[0]), []))
                result[req.rid] = [req.input_logprobs[-1]]
            for i in range(max(req.next_input_logprob, start + 1), min(start + chunk + 1, prompt_len)):
                owed.append((req, i, int(batch.cu_q_lens[s]) + i - 1 - start))
        if not owed:
            return result
        targets = np.zeros(len(batch.input_ids), np.int32)
        targets[[t for _, _, t in owed]] = [req.prompt_ids[i] for req, i, _ in owed]
        want_top = any(req.top_logprobs_num for req, _, _ in owed)
        lps, top_ids, top_lps = self.runner.input_logprobs(hidden, targets, want_top)
        for req, i, t in owed:
            k = req.top_logprobs_num
            entry = (float(lps[t]), int(req.prompt_ids[i]), list(zip(top_lps[t, :k].tolist(), top_ids[t, :k].tolist())))
            req.input_logprobs.append(entry)
            result.setdefault(req.rid, []).append(entry)
        return result

    def _cache_prefill_progress(self, req: Request) -> None:
        """Insert the whole pages a prefill chunk computed, so requests admitted later share
        them while this one is still prefilling; the request's lock moves to the new node.

        If another request cached the same tokens meanwhile, its pages (same KV) replace
        ours in this request's page table and ours are freed.
        """
        full = req.num_computed // self.page_size
        if isinstance(self.cache, NoRadixCache) or full <= len(req.cache_pages):
            return
        pages = req.pages
        _, node = self.cache.insert_with_node(req.tokens[: full * self.page_size], pages[:full])
        self.cache.lock(node)
        self.cache.unlock(req.node)
        cached = self.cache.path_pages(node)  # [full]
        mine = pages[len(req.cache_pages) : full]
        self.allocator.free(mine[mine != cached[len(req.cache_pages) :]])
        req.node, req.cache_pages, req.own_pages = node, cached, pages[full:]

    def _finish_reason(self, req: Request, new_tokens: list[int]) -> dict | None:
        if req.prefill_only and req.num_computed == req.num_tokens:
            return {"type": "length", "length": 0}
        if not new_tokens:
            return None  # mid-prefill
        token = new_tokens[-1]
        if token in req.stop_ids and len(req.output_ids) >= req.params.min_new_tokens:
            return {"type": "stop", "matched": token}
        if len(req.output_ids) >= req.params.max_new_tokens or req.num_tokens >= self.context_length:
            return {"type": "length", "length": len(req.output_ids)}
        return None

    def _emit(self, req: Request, new_tokens, output_lps, input_lps, reason) -> None:
        if reason is not None:
            self._release(req, keep=False)
            req.status, req.finish_reason = Status.FINISHED, reason
        if new_tokens or input_lps or reason is not None:
            self._deliver(req, RequestOutput(req.rid, new_tokens, output_lps, input_lps, reason is not None, reason,
                                             len(req.prompt_ids), req.cached_tokens))

    def _finish(self, req: Request, reason: dict) -> None:
        if req.status is Status.FINISHED:
            return
        if req.status is Status.RUNNING:
            self._release(req, keep=False)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status, req.finish_reason = Status.FINISHED, reason
        self._deliver(req, RequestOutput(req.rid, [], [], [], True, reason, len(req.prompt_ids), req.cached_tokens))

    def _deliver(self, req: Request, out: RequestOutput) -> None:
        """Hand an output to the request's consumer; a consumer that went away (its event
        loop closed) aborts its request instead of taking the scheduler down."""
        try:
            req.on_output(out)
        except Exception:
            logger.warning("request %s lost its consumer; aborting it", req.rid, exc_info=True)
            if not out.finished:
                self.abort(req.rid)

    def _abort(self, rid: str, reason: dict | None) -> None:
        for req in self.running + self.waiting:
            if req.rid == rid:
                self._finish(req, reason or {"type": "abort", "message": "aborted by request"})

    def _retract(self, req: Request) -> None:
        self._release(req, keep=True)
        req.status = Status.WAITING
        self.waiting.insert(0, req)
        self.num_retractions += 1
        logger.info("retracted %s (%d tokens) to free KV pages", req.rid, req.num_tokens)

    def _release(self, req: Request, keep: bool) -> None:
        """Give the computed prefix to the radix cache, free private pages, unlock, free the slot.

        A finished session turn moves the session's lock to the node of its conversation.
        """
        pages, kv_len = req.pages, req.num_computed
        full = kv_len // self.page_size
        present, node = self.cache.insert_with_node(req.tokens[:kv_len], pages[:full])
        if req.session is not None and not req.session.closed and not keep:
            self.cache.lock(node)
            if req.session.node is not None:
                self.cache.unlock(req.session.node)
            req.session.node = node
        self.allocator.free(pages[len(req.cache_pages) : max(present // self.page_size, len(req.cache_pages))])
        self.allocator.free(pages[full:])
        self.cache.unlock(req.node)
        self.running.remove(req)
        self.free_slots.append(req.slot)
        req.node, req.slot, req.num_computed = None, 0, 0
        req.cache_pages = req.own_pages = np.zeros(0, np.int32)

    # ---- sessions ----

    def close_session(self, session) -> None:
        """Unlock a session's conversation (scheduler thread only, e.g. via `call`)."""
        session.closed = True
        if session.node is not None:
            self.cache.unlock(session.node)
            session.node = None

    # ---- inspection ----

    def stats(self) -> dict:
        cache = self.cache
        return {
            "num_running_reqs": len(self.running), "num_waiting_reqs": len(self.waiting),
            "free_pages": cache.free_pages, "evictable_pages": cache.evictable_pages,
            "locked_pages": cache.locked_pages, "total_pages": cache.total_pages,
            "cache_hit_rate": cache.hit_rate, "num_retractions": self.num_retractions,
            "num_steps": self.num_steps,
        }
