"""`python -m jaxserve serve` as a real process: ready line, then SIGTERM stops accepting,
lets short in-flight work finish, aborts what outlasts --shutdown-timeout (its stream still
ends with a final event and [DONE]), and exits 0."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.server_harness import ENGINE_ARGS, compilation_cache_dir, free_port, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]


def read_lines(stream, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line)


def stream_until_end(url: str, max_new_tokens: int, first: threading.Event, out: dict) -> None:
    body = {"text": "keep going", "stream": True, "sampling_params": {"max_new_tokens": max_new_tokens,
                                                                      "ignore_eos": True}}
    events = out.setdefault("events", [])
    try:
        with httpx.stream("POST", url + "/generate", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    first.set()
                elif line == "data: [DONE]":
                    out["done"] = True
    except httpx.HTTPError as e:
        out["error"] = repr(e)
    finally:
        first.set()


def test_sigterm_drains_and_exits_0(tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_ARGS.items()]
    cmd = [sys.executable, "-m", "jaxserve", "serve", "--model-path", str(tiny_model_dir(tmp_path_factory)),
           "--port", str(port), "--served-model-name", "tiny", "--shutdown-timeout", "1.5",
           "--compilation-cache-dir", compilation_cache_dir(tmp_path_factory), *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stderr, lines), daemon=True).start()
    log = []
    try:
        deadline = time.monotonic() + 180
        while not any("ready at" in line for line in log):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(log)
            try:
                log.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        assert f"jaxserve ready at {url}" in "".join(log)
        assert "loading weights: 100%" in "".join(log) and "compiling step buckets: 100%" in "".join(log)
        assert httpx.get(url + "/health").status_code == 200

        short, long = {}, {}
        started = [threading.Event(), threading.Event()]
        threads = [threading.Thread(target=stream_until_end, args=(url, n, ev, out))
                   for n, ev, out in ((30, started[0], short), (490, started[1], long))]
        for t in threads:
            t.start()
        assert all(ev.wait(60) for ev in started)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(log)
        for t in threads:
            t.join(30)
        assert short.get("done") and short["events"][-1]["meta_info"]["finish_reason"]["type"] == "length"
        assert long.get("done"), long.get("error")  # finished in time, or aborted at --shutdown-timeout
        assert long["events"][-1]["meta_info"]["finish_reason"]["type"] in ("length", "abort")
        try:
            httpx.get(url + "/health", timeout=2)
            raise AssertionError("still accepting connections after SIGTERM")
        except httpx.ConnectError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
