"""One model over several processes: node 0 decides, every node runs the same programs.

On JAX's multi-controller runtime every process must launch the same jitted programs,
with the same arguments, in the same order: the KV pool and the weights are global arrays
split over every process's devices. Node 0 runs the scheduler; its `LeaderRunner` sends
each `ModelRunner` call (the step's fixed-shape upload, a row to write, a reset) to the
other nodes before it runs it, and they replay it on their own `ModelRunner` (`follow`).
The call travels through a JAX collective (`broadcast_one_to_all`): a two-int header,
then the pickled call padded to a power of two of bytes, so each size compiles once. The
stop is a call like the others, so every node leaves after the same step.

Failures end every process: a collective with a dead peer fails at once, and the one
that finds it logs who is gone and exits; a hung peer stops its heartbeats and JAX's
coordination service ends the others after `--dist-timeout` seconds. While the scheduler
is idle, node 0 sends a ping every second, so a dead follower is found between requests.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time

import numpy as np

from jaxserve.runner.runner import Forward

logger = logging.getLogger("jaxserve.multihost")

FORWARD = "<the forward of the last step>"  # stands for a `Forward` (device arrays stay where they are)
MIRRORED = ("forward", "sample", "input_logprobs", "set_row", "write_page_row", "reset", "warmup")
_PING_S = 1.0


def _broadcast(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(x)


class Channel:
    """Calls from node 0 to the others, through one collective at a time."""

    def send(self, call: tuple) -> None:
        data = pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL)
        size = max(256, 1 << (len(data) - 1).bit_length())
        payload = np.zeros(size, np.uint8)
        payload[: len(data)] = np.frombuffer(data, np.uint8)
        _broadcast(np.array([len(data), size], np.int32))
        _broadcast(payload)

    def receive(self) -> tuple:
        length, size = _broadcast(np.zeros(2, np.int32))
        payload = _broadcast(np.zeros(int(size), np.uint8))
        return pickle.loads(payload[: int(length)].tobytes())  # noqa: S301 - node 0 of this deployment


def fatal(message: str) -> None:
    """End this process at once: its peers are gone, so nothing can run or shut down."""
    logger.critical("multi-host: %s; every node must be restarted together", message)
    logging.shutdown()
    os._exit(1)


class LeaderRunner:
    """Node 0's `ModelRunner`: each call that launches programs goes to every node first."""

    def __init__(self, runner, channel: Channel | None = None):
        self._runner = runner
        self._channel = channel or Channel()
        self._lock = threading.Lock()  # one collective at a time, in one order on every node
        self._last_call = time.monotonic()
        self._closed = False
        threading.Thread(target=self._ping, name="jaxserve-multihost-ping", daemon=True).start()

    def __getattr__(self, name):
        value = getattr(self._runner, name)
        if name in MIRRORED:
            return lambda *args, **kwargs: self._call(name, value, args, kwargs)
        return value

    def _call(self, name, method, args, kwargs):
        sent = tuple(FORWARD if isinstance(a, Forward) else a for a in args)
        with self._lock:
            self._send((name, sent, kwargs))
            return method(*args, **kwargs)

    def _send(self, call: tuple) -> None:
        try:
            self._channel.send(call)
        except Exception as exc:  # noqa: BLE001 - a peer is gone
            fatal(f"node 0 lost a follower node ({type(exc).__name__}: {exc})")
        self._last_call = time.monotonic()

    def _ping(self) -> None:
        while not self._closed:
            time.sleep(_PING_S / 4)
            if time.monotonic() - self._last_call >= _PING_S:
                with self._lock:
                    if not self._closed:
                        self._send(("ping", (), {}))

    def close(self) -> None:
        """Tell every node to stop (after the scheduler has stopped)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._send(("stop", (), {}))


def follow(runner, channel: Channel | None = None) -> int:
    """A follower node's loop: replay node 0's calls until it says stop; the exit status."""
    channel = channel or Channel()
    last_forward = None
    logger.info("multi-host: following node 0")
    while True:
        try:
            name, args, kwargs = channel.receive()
        except Exception as exc:  # noqa: BLE001
            fatal(f"lost node 0 ({type(exc).__name__}: {exc})")
        if name == "stop":
            logger.info("multi-host: node 0 stopped; this node stops too")
            return 0
        if name == "ping":
            continue
        args = tuple(last_forward if isinstance(a, str) and a == FORWARD else a for a in args)
        try:
            result = getattr(runner, name)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - node 0 would now wait on this node forever
            logger.exception("multi-host: replaying %s failed", name)
            fatal(f"this node could not run node 0's {name} ({type(exc).__name__}: {exc})")
        if name == "forward":
            last_forward = result
