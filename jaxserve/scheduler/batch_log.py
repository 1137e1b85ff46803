"""Batch log lines in SGLang's style: one per step that prefills, one every
`DECODE_LOG_INTERVAL` decode-only steps, so an operator tailing the log sees load, memory
and throughput without scraping `/metrics`:

    Prefill batch. #new-seq: 2, #new-token: 384, #cached-token: 320, token usage: 0.41, #running-req: 6, #queue-req: 3
    Decode batch. #running-req: 8, #token: 2304, token usage: 0.56, gen throughput (token/s): 61.2, #queue-req: 0
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("jaxserve.batches")

DECODE_LOG_INTERVAL = 40  # decode-only steps per decode line (SGLang's default)


class BatchLog:
    def __init__(self) -> None:
        self.decode_steps = 0
        self.decode_tokens = 0
        self.since = time.monotonic()

    def step(self, sched, rows, decode_only: bool) -> None:
        """Account one launched step of `rows`; log when a line is due. A decode-only step
        (the common one) costs two additions and a modulo: its rows are not looked at."""
        prefill = [] if decode_only else [r for r in rows if r.start < r.req.prompt_len]
        if prefill:
            if logger.isEnabledFor(logging.INFO):
                first = [r for r in prefill if r.start == r.req.cached_tokens]  # a request's first chunk
                logger.info("Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
                            "#running-req: %d, #queue-req: %d", len(first), sum(r.chunk for r in prefill),
                            sum(r.req.cached_tokens for r in first), _usage(sched), len(sched.running),
                            len(sched.waiting))
            return
        self.decode_steps += 1
        self.decode_tokens += len(rows)
        if self.decode_steps % DECODE_LOG_INTERVAL or not logger.isEnabledFor(logging.INFO):
            return
        now = time.monotonic()
        cache = sched.cache
        logger.info("Decode batch. #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): %.1f, "
                    "#queue-req: %d", len(sched.running), _used_pages(sched) * cache.page_size, _usage(sched),
                    self.decode_tokens / max(now - self.since, 1e-9), len(sched.waiting))
        self.decode_tokens, self.since = 0, now


def _used_pages(sched) -> int:
    """Pages in use: private to running requests or locked in the tree (not free, not evictable)."""
    cache = sched.cache
    return cache.total_pages - cache.free_pages - cache.evictable_pages


def _usage(sched) -> float:
    return _used_pages(sched) / max(sched.cache.total_pages, 1)
