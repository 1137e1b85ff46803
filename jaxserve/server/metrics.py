"""Prometheus metrics of one server: request outcomes, token counts, latencies, engine state.

Each app gets its own `CollectorRegistry` so several servers in one process (tests,
notebooks) do not collide in the global one. Engine state (running requests, pages,
compilations) is read from the engine at scrape time rather than mirrored.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["ServerMetrics", "RequestTracker", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """The metric objects of one server; `render()` is the `/metrics` body."""

    def __init__(self, server_info: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("jaxserve_requests", "Finished generation requests by outcome "
                                "(stop, length, abort, invalid, error)", ["outcome"], registry=r)
        self.prompt_tokens = Counter("jaxserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("jaxserve_generation_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter("jaxserve_cached_tokens", "Prompt tokens served from the radix cache",
                                     registry=r)
        self.ttft = Histogram("jaxserve_time_to_first_token_seconds", "Time to first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("jaxserve_inter_token_latency_seconds", "Time between output tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("jaxserve_e2e_request_latency_seconds", "Request latency, arrival to finish",
                             buckets=_E2E_BUCKETS, registry=r)
        r.register(_EngineState(server_info))

    def track(self, start: float | None = None) -> RequestTracker:
        """A tracker for one engine request that arrived at `start` (`time.monotonic()`; default now)."""
        return RequestTracker(self, start)

    def render(self) -> bytes:
        """The text exposition; blocks on the engine for live state, so call it off the event loop."""
        return generate_latest(self.registry)


class RequestTracker:
    """Turns one request's cumulative outputs into latency observations and final counts."""

    def __init__(self, metrics: ServerMetrics, start: float | None = None):
        self.metrics = metrics
        self.start = self.last = time.monotonic() if start is None else start
        self.tokens = 0
        self.done = False

    def update(self, out: dict) -> None:
        meta = out["meta_info"]
        now, tokens = time.monotonic(), meta["completion_tokens"]
        if tokens > self.tokens:
            if self.tokens == 0:
                self.metrics.ttft.observe(now - self.start)
            else:  # several tokens in one update (a stop string held back): spread the gap evenly
                self.metrics.itl.observe((now - self.last) / (tokens - self.tokens))
            self.tokens, self.last = tokens, now
        if meta["finish_reason"] is not None:
            self._finish(meta["finish_reason"]["type"], meta)

    def cancelled(self) -> None:
        """The client went away before the request finished."""
        if not self.done:
            self._finish("abort", None)

    def _finish(self, outcome: str, meta: dict | None) -> None:
        self.done = True
        m = self.metrics
        m.requests.labels(outcome).inc()
        m.e2e.observe(time.monotonic() - self.start)
        if meta is not None:
            m.prompt_tokens.inc(meta["prompt_tokens"])
            m.cached_tokens.inc(meta["cached_tokens"])
        m.generation_tokens.inc(self.tokens)


class _EngineState:
    """Collects live engine state at scrape time."""

    def __init__(self, server_info: Callable[[], dict[str, Any]]):
        self.server_info = server_info

    def collect(self) -> Iterator:
        info = self.server_info()
        yield GaugeMetricFamily("jaxserve_num_running_reqs", "Requests being decoded or prefilled",
                                value=info["num_running_reqs"])
        yield GaugeMetricFamily("jaxserve_num_waiting_reqs", "Requests queued for admission",
                                value=info["num_waiting_reqs"])
        pages = GaugeMetricFamily("jaxserve_kv_pages", "KV cache pages by state", labels=["state"])
        for state in ("free", "evictable", "locked", "total"):
            pages.add_metric([state], info[f"{state}_pages"])
        yield pages
        used = info["locked_pages"] / max(info["total_pages"], 1)
        yield GaugeMetricFamily("jaxserve_kv_usage_ratio", "Locked (in use) fraction of KV pages", value=used)
        yield GaugeMetricFamily("jaxserve_cache_hit_rate", "Radix cache hit rate", value=info["cache_hit_rate"])
        yield CounterMetricFamily("jaxserve_retractions", "Requests retracted to free KV pages",
                                  value=info["num_retractions"])
        yield CounterMetricFamily("jaxserve_compilations_after_warmup", "XLA compilations after warm-up "
                                  "(should stay 0)", value=info["compilations_after_warmup"])
