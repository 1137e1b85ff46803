"""Device profiling on request (`/start_profile`, `/stop_profile`): a `jax.profiler` trace
of everything the process runs between the two calls, viewable in TensorBoard / Perfetto."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import jax

from jaxserve.errors import InvalidRequestError


class Profiler:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.output_dir: str | None = None  # set while a trace runs

    def start(self, output_dir: str | None = None) -> str:
        """Start a trace into `output_dir` (a new temporary folder when None); its folder."""
        with self._lock:
            if self.output_dir is not None:
                raise InvalidRequestError(f"a profile is already running into {self.output_dir}; stop it first")
            path = output_dir or tempfile.mkdtemp(prefix=f"jaxserve-profile-{time.strftime('%Y%m%d-%H%M%S')}-")
            Path(path).mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(path)
            self.output_dir = path
            return path

    def stop(self) -> str:
        """Stop the running trace and write it; its folder."""
        with self._lock:
            if self.output_dir is None:
                raise InvalidRequestError("no profile is running; start one with /start_profile")
            jax.profiler.stop_trace()
            path, self.output_dir = self.output_dir, None
            return path
