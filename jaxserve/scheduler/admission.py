"""Admission: waiting requests join the step, within its token budget and the memory.

Each admitted request locks its cached prefix, gets private pages for its first chunk and
a device row. One scheduling pass keeps a running reservation: a request is admitted
only if the pages for the rest of its prompt (plus one to grow), on top of what the pass
already promised to earlier admissions and a page of headroom per running request, can
be found; otherwise the pass stops (head of line waits until memory frees up) instead of
admitting and retracting later. An admission that fails half-way gives back everything
it took.
"""

from __future__ import annotations

import logging

from jaxserve.scheduler.batch import StepPlan
from jaxserve.scheduler.pages import pages_for
from jaxserve.scheduler.policy import order_waiting
from jaxserve.scheduler.request import Request, Status

logger = logging.getLogger(__name__)


def admit_waiting(sched, plan: StepPlan) -> None:
    """Move waiting requests into `plan` while budget, rows and memory allow."""
    if not sched.waiting:
        return
    reserved = len(sched.running)  # headroom: a page to grow per running request
    hicache = sched.book.hicache
    if hicache is not None:
        hicache.begin_pass()
    for req in order_waiting(sched.waiting, sched.policy, sched.book.cache):
        if plan.budget <= 0 or not sched.free_rows:
            return
        if req.inflight:
            continue  # retracted while a step that has it still runs: wait for its results
        if hicache is not None and not hicache.ready(req):
            continue  # its storage prefetch is still running and the policy waits for it
        try:
            promised = _admit(sched, req, plan, reserved)
        except Exception as exc:  # a bad request must not stop the others
            logger.exception("admission of %s failed", req.rid)
            sched.fail(req, f"internal error during admission: {type(exc).__name__}: {exc}")
            continue
        if promised is None:
            return
        reserved += promised


def _admit(sched, req: Request, plan: StepPlan, reserved: int) -> int | None:
    """Admit `req` into `plan`; the pages promised beyond its first chunk, or None (nothing
    taken) when memory is short."""
    book, page_size = sched.book, sched.book.page_size
    matched = book.take_prefix(req)
    row = 0
    try:
        chunk = min(req.num_tokens - matched, sched.chunk_size, plan.budget)
        need = pages_for(req.num_tokens + 1, page_size) - req.num_cache_pages
        if book.available < reserved + need or book.grow(req, matched + chunk) is None:
            book.release(req, "drop")
            return None
        row = sched.free_rows.pop()
        req.row, req.num_computed = row, matched
        sched.runner.set_row(row, req.params, req.seed, req.stop_ids, tokens=req.tokens, num_prompt=req.prompt_len,
                             want_top=req.return_logprob and req.top_logprobs_num > 0, pages=req.live_pages)
    except BaseException:
        book.release(req, "drop")
        if row:
            sched.free_rows.append(row)
            req.row = 0
        raise
    if not req.admitted_once:
        req.cached_tokens, req.admitted_once = matched, True
        logger.debug("radix hit %s: %d of %d prompt tokens cached (%d loaded from the host)", req.rid, matched,
                     req.prompt_len, req.loaded_tokens)
        if book.hicache is not None:
            storage = min(req.storage_tokens, req.loaded_tokens)
            req.cached_details = {"device": matched - req.loaded_tokens, "host": req.loaded_tokens - storage,
                                  "storage": storage}
    req.status = Status.RUNNING
    sched.waiting.remove(req)
    sched.running[req] = None
    plan.add(req, chunk)
    return need - (req.num_pages - req.num_cache_pages)
