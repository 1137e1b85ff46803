"""Continuous batching: request state, the scheduler thread and its single-purpose parts."""

from jaxserve.scheduler.request import Request, RequestOutput, Status
from jaxserve.scheduler.scheduler import Scheduler

__all__ = ["Request", "RequestOutput", "Scheduler", "Status"]
