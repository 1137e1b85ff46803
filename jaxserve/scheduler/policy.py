"""Waiting-queue policies: which waiting request to admit first."""

from __future__ import annotations

from jaxserve.memory import RadixCache
from jaxserve.scheduler.request import Request


def order_waiting(waiting: list[Request], policy: str, cache: RadixCache) -> list[Request]:
    """`fcfs`: arrival order (retracted requests keep their age). `lpm`: longest cached
    prefix first, so requests sharing a prefix run while it is hot in the cache."""
    if policy == "lpm":
        return sorted(waiting, key=lambda r: (-cache.peek_prefix(r.tokens[: r.match_limit()]), r.arrival))
    return list(waiting)  # the scheduler keeps `waiting` in arrival order
