"""`--dp-size D`: D replicas behind SGLang's router (PyPI `sglang-router`).

Each replica is a plain `jaxserve serve` process on a free port of 127.0.0.1, on its own
slice of the accelerators (`CUDA_VISIBLE_DEVICES`: `tp_size` GPUs each). Once every
replica answers `/health`, the router starts on `--host:--port` with `--router-policy`
and the replicas as its workers; it calls them on `/health`, `/model_info`,
`/server_info`, `/get_load`, `/flush_cache` and the generate and OpenAI routes, and
re-sends each request with its own schema's defaults (which the workers accept).
`--api-key` guards the router; the replicas listen on 127.0.0.1 only, without one.

The launcher supervises its children: when any of them exits, or on SIGTERM / SIGINT, it
stops them all (SIGTERM, then SIGKILL after the shutdown timeout) and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from jaxserve.config import ServerArgs

logger = logging.getLogger("jaxserve.dp")

__all__ = ["serve_data_parallel"]


def serve_data_parallel(args: ServerArgs, *, shutdown_timeout: float = 30.0, startup_timeout: float = 1800.0) -> int:
    """Run the replicas and the router until one exits or a signal comes; the exit status."""
    try:
        import sglang_router  # noqa: F401 - only to fail early with a clear message
    except ImportError:
        raise SystemExit("error: --dp-size needs SGLang's router: pip install sglang-router") from None
    ports = [_free_port() for _ in range(args.dp_size)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    children: list[subprocess.Popen] = []
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        for rank, port in enumerate(ports):
            flags = args.to_cli(dp_size=1, host="127.0.0.1", port=port, api_key=None)
            children.append(subprocess.Popen([sys.executable, "-m", "jaxserve", "serve", *flags,
                                              "--shutdown-timeout", str(shutdown_timeout)],
                                             env=replica_env(rank, args.tp_size)))
        if not _wait_healthy(urls, children, stop, startup_timeout):
            return 1
        router = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *urls,
                  "--policy", args.router_policy, "--host", args.host, "--port", str(args.port),
                  "--prometheus-port", str(_free_port()), "--log-level", "warn"]
        if args.api_key:
            router += ["--api-key", args.api_key]
        children.append(subprocess.Popen(router))
        logger.info("jaxserve: %d replicas (%s) behind sglang-router (%s) on %s:%d", args.dp_size, " ".join(urls),
                    args.router_policy, args.host, args.port)
        while not stop:
            for child in children:
                if child.poll() is not None:
                    logger.error("a child process (%s) exited with %s; stopping the others", child.args[2],
                                 child.returncode)
                    return 1
            time.sleep(0.2)
        return 0
    finally:
        _stop_all(children, shutdown_timeout)


def replica_env(rank: int, tp_size: int) -> dict[str, str]:
    """The environment of replica `rank`: its `tp_size` GPUs when the machine has GPUs
    (CPU replicas each have the host's devices; TPU replicas run one per host)."""
    env = dict(os.environ)
    if os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio") and len(os.listdir("/dev/vfio")) > 1:
        raise SystemExit("error: --dp-size on one TPU host is not supported (every process takes all its chips); "
                         "run one replica per host and start the router by hand (docs/DEPLOYMENT.md)")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None and not _has_nvidia_gpus():
        return env
    gpus = visible.split(",") if visible else [str(i) for i in range(_count_nvidia_gpus())]
    mine = gpus[rank * tp_size : (rank + 1) * tp_size]
    if len(mine) < tp_size:
        raise SystemExit(f"error: --dp-size x --tp-size needs {(rank + 1) * tp_size} GPUs, {len(gpus)} are visible")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    return env


def _has_nvidia_gpus() -> bool:
    return os.path.exists("/dev/nvidiactl")


def _count_nvidia_gpus() -> int:
    return sum(1 for name in os.listdir("/dev") if name.startswith("nvidia") and name[6:].isdigit())


def _wait_healthy(urls: list[str], children: list[subprocess.Popen], stop: list, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    pending = set(urls)
    while pending and not stop and time.monotonic() < deadline:
        for child in children:
            if child.poll() is not None:
                logger.error("a replica exited with %s during start-up", child.returncode)
                return False
        for url in sorted(pending):
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        pending.discard(url)
        time.sleep(0.5)
    if pending and not stop:
        logger.error("replicas %s did not become healthy in %.0f s", sorted(pending), timeout)
    return not pending and not stop


def _stop_all(children: list[subprocess.Popen], timeout: float) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout + 5
    for child in children:
        try:
            child.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
