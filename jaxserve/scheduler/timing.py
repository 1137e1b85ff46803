"""StepTimes: where the scheduler thread's time goes, measured where it is spent.

`host` adds the wall time the thread spends planning, launching and handling outputs (not
time blocked on the device); `dispatched` counts the part spent in jitted calls (on a CPU
backend that includes small programs the runtime runs inline, and the device's compute
threads and the event loop's thread compete with this one for the cores and the GIL).
`waited` is time blocked fetching a step's results. With
`watch_device = True` (benchmarks) a watcher thread also timestamps when each step's
results are ready on the device, so the gap between one step finishing and the next
one's forward being launched (the device-idle gap) is measured directly.
"""

from __future__ import annotations

import collections
import queue
import statistics
import threading
import time

import jax

_WINDOW = 2048  # recent steps kept for the summary


class StepTimes:
    def __init__(self):
        self.host_s: collections.deque[float] = collections.deque(maxlen=_WINDOW)  # wall
        self.dispatch_s: collections.deque[float] = collections.deque(maxlen=_WINDOW)  # of host_s: in jit calls
        self.decode_rows: collections.deque[int] = collections.deque(maxlen=_WINDOW)  # per host_s entry, 0 = other
        self.wait_s: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self.gap_s: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._current = 0.0  # host wall time of the iteration in progress
        self._current_dispatch = 0.0
        self._seq = 0  # steps launched
        self._launched_at: dict[int, float] = {}  # step -> when its forward was launched
        self._done_at: dict[int, float] = {}  # step -> when its results were ready
        self._watch: queue.SimpleQueue | None = None

    def host(self, since: float) -> None:
        """Add the host time since `since` (a `time.perf_counter()`)."""
        self._current += time.perf_counter() - since

    def dispatched(self, since: float) -> None:
        """Count the time since `since` as spent launching jitted programs (a part of
        `host`; on a CPU backend it includes small programs the runtime runs inline)."""
        self._current_dispatch += time.perf_counter() - since

    def waited(self, seconds: float) -> None:
        self.wait_s.append(seconds)

    def end_iteration(self, decode_rows: int) -> None:
        """Close an iteration; `decode_rows`: the batch size if it launched a decode-only step."""
        if self._current:
            self.host_s.append(self._current)
            self.dispatch_s.append(self._current_dispatch)
            self.decode_rows.append(decode_rows)
        self._current = self._current_dispatch = 0.0

    def forward_launched(self) -> None:
        self._seq += 1
        if self._watch is not None:
            self._launched_at[self._seq] = time.perf_counter()
            done = self._done_at.pop(self._seq - 1, None)
            if done is not None:  # the previous step was ready before this one was launched
                self.gap_s.append(self._launched_at[self._seq] - done)
            elif self._seq - 1 in self._launched_at:
                self.gap_s.append(0.0)  # launched while the previous step still ran
            self._launched_at.pop(self._seq - 1, None)

    def launched(self, sampled) -> None:
        if self._watch is not None:
            self._watch.put((self._seq, sampled.packed))

    def watch_device(self, on: bool = True) -> None:
        """Start (or stop) timestamping step completions on a watcher thread."""
        if on and self._watch is None:
            self._watch = queue.SimpleQueue()
            threading.Thread(target=self._watcher, args=(self._watch,), daemon=True, name="jaxserve-step-watch").start()
        elif not on and self._watch is not None:
            self._watch.put(None)
            self._watch = None
        self._launched_at.clear()
        self._done_at.clear()

    def _watcher(self, q: queue.SimpleQueue) -> None:
        while (item := q.get()) is not None:
            seq, array = item
            jax.block_until_ready(array)
            if self._seq == seq:  # the next step is not launched yet: the device idles from now
                self._done_at[seq] = time.perf_counter()

    def reset(self) -> None:
        self.host_s.clear()
        self.dispatch_s.clear()
        self.decode_rows.clear()
        self.wait_s.clear()
        self.gap_s.clear()

    def summary(self) -> dict[str, float]:
        def ms(values, fn):
            return round(fn(values) * 1e3, 4) if values else 0.0

        return {"host_ms_per_step_median": ms(self.host_s, statistics.median),
                "dispatch_ms_per_step_median": ms(self.dispatch_s, statistics.median),
                "device_idle_gap_ms_median": ms(self.gap_s, statistics.median)}
