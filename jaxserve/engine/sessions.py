"""Sessions: conversations whose KV the scheduler keeps cached between turns.

Each turn's input is appended to the conversation so far, so its prefix is a cache hit.
A session takes one turn at a time (`begin_turn` is an atomic check-and-set). While a
session is open the scheduler pins its conversation, within a bound, and lets it go
under memory pressure (the next turn then recomputes what was evicted). Sessions idle
past `--session-timeout` are closed by a reaper thread that survives its own errors.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import numpy as np

from jaxserve.errors import EngineOverloadedError, InvalidRequestError

logger = logging.getLogger(__name__)


class Session:
    def __init__(self, session_id: str, capacity_of_str_len: int | None = None):
        self.id = session_id
        self.capacity_of_str_len = capacity_of_str_len
        self.tokens = np.zeros(0, np.int32)  # the conversation so far
        self.closed = False  # a turn finishing after close must not pin again
        self.last_used = time.monotonic()
        self._busy = threading.Lock()

    def begin_turn(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise InvalidRequestError(f"session {self.id} already has a turn in flight; send one turn at a time")

    def end_turn(self, tokens: np.ndarray | None) -> None:
        """`tokens`: the whole conversation after a turn that finished normally, else None."""
        if tokens is not None:
            self.tokens = tokens
        self.last_used = time.monotonic()
        self._busy.release()

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    def idle_for(self) -> float:
        return time.monotonic() - self.last_used


class Sessions:
    """The open sessions of one engine; `close` unpins on the scheduler thread."""

    def __init__(self, scheduler, timeout: float, max_open: int = 1024):
        self.scheduler = scheduler
        self.timeout = timeout
        self.max_open = max_open
        self.open: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._reap, name="jaxserve-sessions", daemon=True).start()

    def create(self, capacity_of_str_len: int | None = None, session_id: str | None = None) -> str:
        sid = session_id or uuid.uuid4().hex
        with self._lock:
            if sid in self.open:
                raise InvalidRequestError(f"session {sid} is already open")
            if len(self.open) >= self.max_open:
                raise EngineOverloadedError(f"{len(self.open)} sessions are open, the most this server keeps "
                                            "(--max-sessions); close one or retry later")
            self.open[sid] = Session(sid, capacity_of_str_len)
        return sid

    def get(self, session_params) -> Session | None:
        if session_params is None:
            return None
        if not isinstance(session_params, dict) or not isinstance(session_params.get("id"), str):
            raise InvalidRequestError("`session_params` must be an object with a string `id`")
        extra = sorted(k for k, v in session_params.items() if k != "id" and v not in (None, False))
        if extra:
            raise InvalidRequestError(f"session_params {extra} are not supported; only `id` (append to the conversation)")
        session = self.open.get(session_params["id"])
        if session is None:
            raise InvalidRequestError(f"no open session {session_params['id']!r}; call /open_session first")
        return session

    def close(self, session_id: str) -> None:
        with self._lock:
            session = self.open.pop(session_id, None)
        if session is None:
            raise InvalidRequestError(f"no open session {session_id!r}")
        self.scheduler.call(lambda: self.scheduler.close_session(session))

    def stop(self) -> None:
        self._stopped.set()

    def _reap(self) -> None:
        while not self._stopped.wait(min(5.0, self.timeout / 2)):
            try:
                for sid, session in list(self.open.items()):
                    if not session.busy and session.idle_for() > self.timeout:
                        logger.info("closing session %s: idle for %.0fs", sid, session.idle_for())
                        self.close(sid)
            except Exception:  # noqa: BLE001 - the reaper must outlive any one failure
                logger.exception("session reaper: closing an idle session failed; retrying later")
