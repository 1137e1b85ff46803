"""Session: a conversation whose KV stays locked in the radix cache across turns.

Each turn's input is appended to the conversation so far, so its prefix is always a cache
hit; the node holding the conversation is locked until the session is closed or idle
past `--session-timeout`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np


@dataclasses.dataclass(eq=False)
class Session:
    id: str
    capacity_of_str_len: int | None = None
    tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))  # the conversation
    node: Any = None  # locked radix node holding the conversation's whole pages
    busy: bool = False  # a turn is in flight
    closed: bool = False  # a turn finishing after close must not lock again
    last_used: float = dataclasses.field(default_factory=time.monotonic)

    def idle_for(self) -> float:
        return time.monotonic() - self.last_used
