"""Running requests in a step: the next decode token or prefill chunk of each, and
retraction when the pool runs dry.

A running request feeds whatever it has not fed yet: the rest of its prompt in chunks,
then one token per step (with the overlap loop, the token the previous step sampled,
still on the device). When its pages cannot grow even after evicting the cache and
unpinning sessions, the running request with the least progress that is not in this
step is retracted (its computed prefix goes to the radix cache, its pages are freed, it
waits again and recomputes later), or, if there is none, the request itself.
"""

from __future__ import annotations

import logging

from jaxserve.scheduler.batch import StepPlan
from jaxserve.scheduler.request import Request

logger = logging.getLogger(__name__)


def plan_running(sched, plan: StepPlan) -> None:
    """Add every running request that has a token to feed to `plan`."""
    page_size, chunk_size, running = sched.book.page_size, sched.chunk_size, sched.running
    for req in list(running):
        if plan.budget <= 0:
            return
        if req not in running:
            continue  # retracted by an earlier request of this pass
        fed = req.num_computed
        todo = req.num_tokens + req.num_pending - fed
        if todo <= 0 or (req.num_pending and req.num_tokens + req.num_pending >= req.token_limit):
            continue  # nothing to feed, or every token it may sample is already sampled
        if fed < req.prompt_len:
            # The chunks launched so far (possibly still running: every later reader runs
            # after them) enter the cache, so requests admitted from now on share them.
            sched.book.cache_progress(req, fed)
        chunk = min(todo, chunk_size, plan.budget)
        if fed + chunk <= req.num_pages * page_size:  # the common case: its last page has room
            plan.add(req, chunk)
            continue
        new_pages = sched.book.grow(req, fed + chunk)
        while new_pages is None:
            victim = _victim(sched, plan, req)
            sched.retract(victim)
            if victim is req:
                break
            new_pages = sched.book.grow(req, req.num_computed + chunk)
        if new_pages is not None:
            plan.add(req, chunk, new_pages)


def _victim(sched, plan: StepPlan, req: Request) -> Request:
    """The running request to retract: least output, then the newest; never one already
    in this step. `req` itself when there is no other."""
    best, best_key = req, None
    for other in sched.running:
        if other is req or other in plan:
            continue
        key = (other.num_outputs, -other.arrival)
        if best_key is None or key < best_key:
            best, best_key = other, key
    return best
