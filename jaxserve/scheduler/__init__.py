"""Continuous batching: request state, waiting-queue policies and the scheduler thread."""

from jaxserve.scheduler.request import Request, RequestOutput, Status
from jaxserve.scheduler.scheduler import Scheduler

__all__ = ["Request", "RequestOutput", "Scheduler", "Status"]
