"""Multi-host serving on JAX's multi-controller runtime: 2 processes x 2 CPU devices (gloo
collectives over 127.0.0.1) serve the bundled SmolLM2 with tp=4 across them, started with
`--nnodes 2 --node-rank R --dist-init-addr` like a user would.

Every spawned group runs in its own session under a watchdog that kills it after
`GROUP_LIMIT_S`, whatever the test does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

import jaxserve
from tests.server_harness import free_port

GROUP_LIMIT_S = 300
# Few token buckets (1 .. 32): every one is compiled at start-up, on each node.
FLAGS = ["--tp-size", "4", "--nnodes", "2", "--max-running-requests", "4", "--max-prefill-tokens", "32",
         "--chunked-prefill-size", "32", "--context-length", "128", "--dist-timeout", "10"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colors: red,"]


class Group:
    """N `jaxserve serve` processes of one multi-host model, killed at the latest after the limit."""

    def __init__(self, tmp_path, flags_per_node: list[list[str]]):
        self.port, coordinator = free_port(), free_port()
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        self.logs, self.procs = [], []
        for rank, extra in enumerate(flags_per_node):
            log = open(tmp_path / f"node{rank}.log", "w+")
            cmd = [sys.executable, "-m", "jaxserve", "serve", *FLAGS, *extra, "--node-rank", str(rank),
                   "--dist-init-addr", f"127.0.0.1:{coordinator}", "--port", str(self.port)]
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True))
            self.logs.append(log)
        self.watchdog = threading.Timer(GROUP_LIMIT_S, self.kill)
        self.watchdog.daemon = True
        self.watchdog.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + GROUP_LIMIT_S
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in self.procs), self.log(0) + self.log(1)
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("the group did not start\n" + self.log(0))

    def wait_exit(self, rank: int, timeout: float) -> int | None:
        try:
            return self.procs[rank].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log(self, rank: int) -> str:
        log = self.logs[rank]
        log.flush()
        log.seek(0)
        return "\n".join(line for line in log.read().splitlines() if not line.startswith("[Gloo]"))

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)

    def close(self) -> None:
        self.kill()
        for p in self.procs:
            p.wait()
        self.watchdog.cancel()
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    g = Group(tmp_path_factory.mktemp("multihost"), [[], []])
    try:
        g.wait_ready()
        yield g
    finally:
        g.close()


def test_two_processes_equal_one_process(group):
    """Greedy tokens and prompt logprobs through node 0's HTTP server equal one process
    with the same 4-device mesh."""
    body = {"text": PROMPTS, "sampling_params": {"max_new_tokens": 12, "temperature": 0},
            "return_logprob": True, "logprob_start_len": 0}
    response = httpx.post(group.url + "/generate", json=body, timeout=180)
    assert response.status_code == 200, response.text
    engine = jaxserve.Engine(tp_size=4, max_running_requests=4, max_prefill_tokens=32, chunked_prefill_size=32,
                             context_length=128)
    try:
        alone = engine.generate(PROMPTS, {"max_new_tokens": 12, "temperature": 0}, return_logprob=True,
                                logprob_start_len=0)
    finally:
        engine.shutdown()
    for ours, ref in zip(response.json(), alone):
        assert ours["output_ids"] == ref["output_ids"], (ours["text"], ref["text"])
        got = [lp for lp, _, _ in ours["meta_info"]["input_token_logprobs"][1:]]
        want = [lp for lp, _, _ in ref["meta_info"]["input_token_logprobs"][1:]]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_killing_a_follower_ends_node_0_with_a_clear_message(group):
    assert httpx.get(group.url + "/health", timeout=5).status_code == 200
    os.killpg(group.procs[1].pid, signal.SIGKILL)
    start = time.monotonic()
    rc = group.wait_exit(0, timeout=30)
    assert rc not in (None, 0), "node 0 outlived its follower by 30 s\n" + group.log(0)[-2000:]
    assert time.monotonic() - start < 30
    assert "multi-host: node 0 lost a follower node" in group.log(0), group.log(0)[-2000:]


def test_mismatched_flags_stop_every_node_with_a_clear_error(tmp_path):
    g = Group(tmp_path, [[], ["--context-length", "512"]])
    try:
        codes = [g.wait_exit(rank, timeout=60) for rank in (0, 1)]
        assert codes == [1, 1], (codes, g.log(0)[-1500:], g.log(1)[-1500:])
        assert "--context-length 512 here, 128 on node 0" in g.log(1)
        assert "node(s) [1] were started with flags that differ from node 0's" in g.log(0)
    finally:
        g.close()
