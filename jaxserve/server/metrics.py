"""Prometheus metrics of one server: request outcomes, token counts, latencies, engine state.

Each app gets its own `CollectorRegistry` so several servers in one process (tests,
notebooks) do not collide in the global one. Request metrics are observed from the
engine's deltas as the response is formatted (`ServerMetrics.tracked`), one tracker per
branch; engine state (running requests, pages, compilations) is read from the engine at
scrape time rather than mirrored.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxserve.errors import EngineUnavailableError, InvalidRequestError
from jaxserve.scheduler import RequestOutput

__all__ = ["ServerMetrics", "RequestTracker", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


class ServerMetrics:
    """The metric objects of one server; `render()` is the `/metrics` body."""

    def __init__(self, server_info: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("jaxserve_requests", "Finished generation requests by outcome "
                                "(stop, length, abort, invalid, overloaded, error)", ["outcome"], registry=r)
        self.prompt_tokens = Counter("jaxserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("jaxserve_generation_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter("jaxserve_cached_tokens", "Prompt tokens served from the radix cache",
                                     registry=r)
        self.tier_tokens = Counter("jaxserve_cached_tokens_by_tier", "Prompt tokens served from each tier of the "
                                   "hierarchical cache (device, host, storage)", ["tier"], registry=r)
        self.ttft = Histogram("jaxserve_time_to_first_token_seconds", "Time to first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("jaxserve_inter_token_latency_seconds", "Time between output tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("jaxserve_e2e_request_latency_seconds", "Request latency, arrival to finish",
                             buckets=_E2E_BUCKETS, registry=r)
        self.sparsity = Histogram("jaxserve_attention_sparsity_ratio", "Per request with sparse attention: KV "
                                  "tokens its decode steps skipped / what dense steps read", buckets=_RATIO_BUCKETS,
                                  registry=r)
        r.register(_EngineState(server_info))

    async def tracked(self, deltas: AsyncIterator[tuple[int, RequestOutput]], branches: int,
                      start: float) -> AsyncIterator[tuple[int, RequestOutput]]:
        """`deltas` (an engine stream of `branches` branches that arrived at `start`), passed
        through while observed; a branch left unfinished when the stream closes counts as
        aborted."""
        trackers = [RequestTracker(self, start) for _ in range(branches)]
        try:
            async with aclosing(deltas):
                async for index, delta in deltas:
                    trackers[index].update(delta)
                    yield index, delta
        except (InvalidRequestError, EngineUnavailableError):
            trackers = []  # refused before it ran: the error handler counts it
            raise
        finally:
            for tracker in trackers:
                tracker.cancelled()

    def render(self) -> bytes:
        """The text exposition; blocks on the engine for live state, so call it off the event loop."""
        return generate_latest(self.registry)


class RequestTracker:
    """Turns one branch's deltas into latency observations and final counts."""

    def __init__(self, metrics: ServerMetrics, start: float):
        self.metrics = metrics
        self.start = self.last = start
        self.tokens = 0
        self.done = False

    def update(self, delta: RequestOutput) -> None:
        now, tokens = time.monotonic(), delta.completion_tokens
        if tokens > self.tokens:
            if self.tokens == 0:
                self.metrics.ttft.observe(now - self.start)
            else:  # several tokens in one update (a stop string held back): spread the gap evenly
                self.metrics.itl.observe((now - self.last) / (tokens - self.tokens))
            self.tokens, self.last = tokens, now
        if delta.finished:
            self._finish(delta.finish_reason["type"], delta)

    def cancelled(self) -> None:
        """The client went away before the request finished."""
        if not self.done:
            self._finish("abort", None)

    def _finish(self, outcome: str, last: RequestOutput | None) -> None:
        self.done = True
        m = self.metrics
        m.requests.labels(outcome).inc()
        m.e2e.observe(time.monotonic() - self.start)
        if last is not None:
            m.prompt_tokens.inc(last.prompt_tokens)
            m.cached_tokens.inc(last.cached_tokens)
            for tier, tokens in (last.cached_tokens_details or {}).items():
                m.tier_tokens.labels(tier).inc(tokens)
            if last.attention_sparsity_ratio is not None:
                m.sparsity.observe(last.attention_sparsity_ratio)
        m.generation_tokens.inc(self.tokens)


class _EngineState:
    """Collects live engine state at scrape time."""

    def __init__(self, server_info: Callable[[], dict[str, Any]]):
        self.server_info = server_info

    def collect(self) -> Iterator:
        try:
            info = self.server_info()
        except EngineUnavailableError:  # the request metrics stay readable after the engine died
            return
        yield GaugeMetricFamily("jaxserve_num_running_reqs", "Requests being decoded or prefilled",
                                value=info["num_running_reqs"])
        yield GaugeMetricFamily("jaxserve_num_waiting_reqs", "Requests queued for admission",
                                value=info["num_waiting_reqs"])
        pages = GaugeMetricFamily("jaxserve_kv_pages", "KV cache pages by state", labels=["state"])
        for state in ("free", "evictable", "locked", "private", "total"):
            pages.add_metric([state], info[f"{state}_pages"])
        yield pages
        used = (info["locked_pages"] + info["private_pages"]) / max(info["total_pages"], 1)
        yield GaugeMetricFamily("jaxserve_kv_usage_ratio", "Fraction of KV pages in use (locked in the tree or held "
                                "by running requests)", value=used)
        yield GaugeMetricFamily("jaxserve_cache_hit_rate", "Radix cache hit rate", value=info["cache_hit_rate"])
        yield CounterMetricFamily("jaxserve_retractions", "Requests retracted to free KV pages",
                                  value=info["num_retractions"])
        yield CounterMetricFamily("jaxserve_compilations_after_warmup", "XLA compilations after warm-up "
                                  "(should stay 0)", value=info["compilations_after_warmup"])
        if "host_total_pages" in info:
            yield from _hicache_metrics(info)


_TRANSFERS = {"d2h": ("d2h_pages", "d2h_bytes", "d2h_seconds"), "h2d": ("h2d_pages", "h2d_bytes", "h2d_seconds"),
              "storage_write": ("storage_written_pages", "storage_bytes_written", "storage_write_seconds"),
              "storage_read": ("storage_read_pages", "storage_bytes_read", "storage_read_seconds")}


def _hicache_metrics(info: dict[str, Any]) -> Iterator:
    """The hierarchical cache: host pages by state, pages / bytes / seconds moved each way,
    and the bandwidth of each way (bytes over the seconds its copies took)."""
    pages = GaugeMetricFamily("jaxserve_hicache_host_pages", "Host (L2) KV pages by state", labels=["state"])
    for state in ("free", "evictable", "locked", "total"):
        pages.add_metric([state], info[f"host_{state}_pages"])
    yield pages
    moved = CounterMetricFamily("jaxserve_hicache_transfer_pages", "KV pages moved, by direction",
                                labels=["direction"])
    nbytes = CounterMetricFamily("jaxserve_hicache_transfer_bytes", "KV bytes moved, by direction",
                                 labels=["direction"])
    bandwidth = GaugeMetricFamily("jaxserve_hicache_bandwidth_bytes_per_second",
                                  "Bytes moved over the seconds spent copying, by direction", labels=["direction"])
    for way, (p, b, s) in _TRANSFERS.items():
        if p not in info or b not in info:
            continue
        moved.add_metric([way], info[p])
        nbytes.add_metric([way], info[b])
        bandwidth.add_metric([way], info[b] / info[s] if info.get(s) else 0.0)
    yield moved
    yield nbytes
    yield bandwidth
