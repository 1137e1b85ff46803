"""Load against a real server: 32 concurrent streams, clients that vanish mid-stream, and
scripts/bench_serving.py with tiny counts (so it cannot rot)."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.server_harness import assert_idle_accounting, http, server  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


async def stream_generate(client: httpx.AsyncClient, body: dict, keep: int | None = None) -> list[dict]:
    """Read a /generate stream; with `keep`, hang up after that many events."""
    events = []
    async with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if keep is not None and len(events) >= keep:
                    return events  # leaving the block closes the connection mid-stream
            elif line:
                assert line == "data: [DONE]"
    return events


def test_32_concurrent_streams_complete(server, http):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            bodies = [{"text": f"Request number {i}: " + "word " * (i % 7 * 5),
                       "sampling_params": {"max_new_tokens": 8 + i % 9, "ignore_eos": True}} for i in range(32)]
            return await asyncio.gather(*(stream_generate(client, b) for b in bodies))

    results = asyncio.run(main())
    assert len(results) == 32
    for i, events in enumerate(results):
        final = events[-1]["meta_info"]
        assert final["finish_reason"] == {"type": "length", "length": 8 + i % 9}
        texts = [e["text"] for e in events]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    info = assert_idle_accounting(http)
    assert info["compilations_after_warmup"] == 0


def test_disconnects_abort_and_free_pages(server, http):
    long = {"max_new_tokens": 400, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            hung_up = await asyncio.gather(*(
                stream_generate(client, {"text": f"vanishing client {i}", "sampling_params": long}, keep=2)
                for i in range(16)))
            # A non-streaming client that gives up: its request is aborted too.
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/generate", json={"text": "impatient", "sampling_params": long}, timeout=0.5)
            return hung_up

    before = aborted_count(http)
    hung_up = asyncio.run(main())
    assert all(len(events) == 2 for events in hung_up)
    assert_idle_accounting(http)
    assert aborted_count(http) - before == 17
    # ... and the server still serves.
    assert http.post("/generate", json={"text": "after", "sampling_params": {"max_new_tokens": 2}}).status_code == 200


def aborted_count(http) -> float:
    lines = [line for line in http.get("/metrics").text.splitlines()
             if line.startswith('jaxserve_requests_total{outcome="abort"}')]
    return float(lines[0].split()[-1]) if lines else 0.0


@pytest.mark.parametrize("dataset", ["random", "shared-prefix", "multi-turn"])
def test_bench_serving_runs(server, dataset, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_serving.py"), "--base-url", server.url,
           "--dataset", dataset, "--num-requests", "6", "--max-concurrency", "3", "--input-len", "24",
           "--output-len", "6", "--system-prompt-len", "64", "--turns", "2", "--duration", "60",
           "--output-json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| TTFT p50 / p99 (ms) |" in run.stdout and "| output throughput (tok/s) |" in run.stdout
    results = json.loads(out.read_text())["results"]
    assert len(results) == 6 and all(r["ok"] and r["completion_tokens"] >= 3 for r in results)
    if dataset != "random":
        assert sum(r["cached_tokens"] for r in results) > 0  # shared system prompt / history
