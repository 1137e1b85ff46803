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
    """Traces go into a new folder under `base_dir` (the operator's `--profile-dir`; the
    system's temporary directory when None): a client never chooses a path."""

    def __init__(self, base_dir: str | None = None) -> None:
        self.base_dir = base_dir
        self._lock = threading.Lock()
        self.output_dir: str | None = None  # set while a trace runs

    def start(self) -> str:
        """Start a trace into a new folder; its path."""
        with self._lock:
            if self.output_dir is not None:
                raise InvalidRequestError(f"a profile is already running into {self.output_dir}; stop it first")
            if self.base_dir is not None:
                Path(self.base_dir).mkdir(parents=True, exist_ok=True)
            path = tempfile.mkdtemp(prefix=f"jaxserve-profile-{time.strftime('%Y%m%d-%H%M%S')}-", dir=self.base_dir)
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
