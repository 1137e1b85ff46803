"""Soak: minutes of mixed, partly hostile load on a real server with a small KV pool, then
checks that nothing was lost and nothing leaked.

    python scripts/soak.py --minutes 20 --clients 16

One engine (SmolLM2 unless `--model-path`; `--quick`: a tiny random model for about 12
seconds, what the suite runs) behind a real HTTP server on 127.0.0.1, with a KV pool of
`--pool` tokens, so prefixes are evicted and requests retracted all the time. `--clients`
async clients loop until the deadline, each picking at random:

- greedy `/generate` and `/v1/completions`, streaming or not, over a few prompts that
  share prefixes: the text must equal the reference (the same prompt alone, at start);
- `n > 1` sampling, OpenAI chat streaming with usage: the right number of choices and
  tokens;
- a session opened, one or two turns, then abandoned (the reaper closes it);
- a stream closed by the client after two chunks (the server aborts it);
- a request aborted through `/abort_request` while it runs: it ends `abort` or finished;
- `/flush_cache`: 200, or 400 while requests run;
- malformed bodies and bad fields: a 4xx that names the problem.

At the end: no request failed in a way it should not have, `free + evictable + locked ==
total` pages with nothing locked, no compilation after warm-up, RSS growth since the
first tenth of the run under `--max-rss-growth-mb`, and p50 / p99 latency per kind.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import statistics
import sys
import tempfile
import time

import httpx

import jaxserve
from jaxserve.server import ServerThread

SHARED = "You are a careful assistant. Answer briefly and precisely. " * 4


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Soak:
    def __init__(self, url: str, prompts: list[str], reference: dict[str, str], max_new_tokens: int, seed: int):
        self.url, self.prompts, self.reference = url, prompts, reference
        self.max_new = max_new_tokens
        self.rng = random.Random(seed)
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.failures: list[str] = []
        self.counts: collections.Counter = collections.Counter()

    def fail(self, kind: str, message: str) -> None:
        self.failures.append(f"{kind}: {message}")

    @property
    def greedy(self) -> dict:
        return {"temperature": 0, "max_new_tokens": self.max_new}

    async def client(self, http: httpx.AsyncClient, deadline: float) -> None:
        kinds = [self.generate, self.generate_stream, self.completion, self.chat_stream, self.sample_n, self.session,
                 self.disconnect, self.abort, self.flush, self.malformed]
        while time.monotonic() < deadline:
            action = self.rng.choice(kinds)
            start = time.monotonic()
            try:
                await action(http)
            except (httpx.TransportError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                self.fail(action.__name__, f"{type(e).__name__}: {e}")
            self.latency[action.__name__].append(time.monotonic() - start)
            self.counts[action.__name__] += 1

    async def generate(self, http) -> None:
        prompt = self.rng.choice(self.prompts)
        r = await http.post("/generate", json={"text": prompt, "sampling_params": self.greedy})
        if r.status_code != 200 or r.json()["text"] != self.reference[prompt]:
            self.fail("generate", f"{r.status_code} {r.text[:200]}")

    async def generate_stream(self, http) -> None:
        prompt = self.rng.choice(self.prompts)
        text = None
        async with http.stream("POST", "/generate", json={"text": prompt, "sampling_params": self.greedy,
                                                           "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text = json.loads(line[6:])["text"]
        if text != self.reference[prompt]:
            self.fail("generate_stream", f"text {text!r:.80}")

    async def completion(self, http) -> None:
        prompt = self.rng.choice(self.prompts)
        r = await http.post("/v1/completions", json={"model": "soak", "prompt": prompt, "max_tokens": self.max_new,
                                                      "temperature": 0})
        if r.status_code != 200 or r.json()["choices"][0]["text"] != self.reference[prompt]:
            self.fail("completion", f"{r.status_code} {r.text[:200]}")

    async def chat_stream(self, http) -> None:
        body = {"model": "soak", "messages": [{"role": "user", "content": self.rng.choice(self.prompts)}],
                "max_tokens": self.max_new, "stream": True, "stream_options": {"include_usage": True},
                "temperature": 0.7, "ignore_eos": True}
        usage = None
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage") or usage
        if usage is None or usage["completion_tokens"] != self.max_new:
            self.fail("chat_stream", f"usage {usage}")

    async def sample_n(self, http) -> None:
        r = await http.post("/generate", json={"text": self.rng.choice(self.prompts), "sampling_params": {
            "temperature": 0.8, "max_new_tokens": self.max_new, "n": 3, "ignore_eos": True}})
        out = r.json()
        if r.status_code != 200 or len(out) != 3 or any(o["meta_info"]["completion_tokens"] != self.max_new for o in out):
            self.fail("sample_n", f"{r.status_code} {r.text[:200]}")

    async def session(self, http) -> None:
        r = await http.post("/open_session", json={})
        if r.status_code == 503:
            return  # at --max-sessions: a clean refusal
        sid = r.json()
        for turn in range(self.rng.randint(1, 2)):
            r = await http.post("/generate", json={"text": f" turn {turn}: " + self.rng.choice(self.prompts),
                                                   "session_params": {"id": sid},
                                                   "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
            if r.status_code != 200:
                self.fail("session", f"{r.status_code} {r.text[:200]}")
        # abandoned: never closed, the reaper frees it after --session-timeout

    async def disconnect(self, http) -> None:
        body = {"text": self.rng.choice(self.prompts), "stream": True,
                "sampling_params": {"max_new_tokens": 4 * self.max_new, "ignore_eos": True}}
        async with http.stream("POST", "/generate", json=body) as r:
            chunks = 0
            async for _ in r.aiter_lines():
                chunks += 1
                if chunks >= 2:
                    break  # the client goes away mid-stream

    async def abort(self, http) -> None:
        rid = f"soak-{self.rng.getrandbits(48):x}"
        body = {"text": self.rng.choice(self.prompts), "rid": rid,
                "sampling_params": {"max_new_tokens": 4 * self.max_new, "ignore_eos": True}}
        task = asyncio.create_task(http.post("/generate", json=body))
        await asyncio.sleep(self.rng.uniform(0.0, 0.3))
        await http.post("/abort_request", json={"rid": rid})
        r = await task
        reason = r.json()["meta_info"]["finish_reason"]["type"] if r.status_code == 200 else None
        if reason not in ("abort", "length"):
            self.fail("abort", f"{r.status_code} {r.text[:200]}")

    async def flush(self, http) -> None:
        r = await http.post("/flush_cache")
        if r.status_code not in (200, 400):
            self.fail("flush", f"{r.status_code} {r.text[:200]}")

    async def malformed(self, http) -> None:
        body = self.rng.choice([b"{not json", b"[1, 2]", json.dumps({"text": "x", "sampling_params": {"top_p": 7}}).encode(),
                                json.dumps({"text": "x", "bogus_field": 1}).encode(), b""])
        r = await http.post("/generate", content=body)
        if not 400 <= r.status_code < 500 or "message" not in r.json().get("error", {}):
            self.fail("malformed", f"{r.status_code} {r.text[:200]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--pool", type=int, default=2048, help="KV pool, tokens (small on purpose)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--max-rss-growth-mb", type=float, default=256.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny random model for about 12 s (the suite)")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    if args.quick:
        sys.path.insert(0, os.path.dirname(__file__))
        from bench_host_overhead import tiny_model

        args.model_path, args.minutes, args.clients, args.pool = tiny_model(tmp.name), 1 / 5, 8, 512
    engine = jaxserve.Engine(args.model_path, max_total_tokens=args.pool, context_length=512, max_running_requests=8,
                             max_prefill_tokens=256, chunked_prefill_size=256, session_timeout=5.0, max_sessions=32,
                             served_model_name="soak")
    server = ServerThread(engine)
    prompts = [SHARED + q for q in ("What is a prime number?", "Name a river.", "Define entropy.",
                                    "Why is the sky blue?")] + ["Count to five.", "Say hello."]
    reference = {p: engine.generate(prompt=p, sampling_params={"temperature": 0, "max_new_tokens": args.max_new_tokens})
                 ["text"] for p in prompts}
    soak = Soak(server.url, prompts, reference, args.max_new_tokens, args.seed)
    start = time.monotonic()
    deadline = start + 60 * args.minutes
    rss_samples: list[tuple[float, float]] = []

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            async def sample_rss():
                while time.monotonic() < deadline:
                    rss_samples.append((time.monotonic() - start, rss_mb()))
                    await asyncio.sleep(1.0)

            await asyncio.gather(sample_rss(), *(soak.client(http, deadline) for _ in range(args.clients)))

    asyncio.run(run())
    checks: list[tuple[str, bool, str]] = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for _ in range(200):  # aborts and disconnects settle asynchronously
            info = http.get("/get_server_info").json()
            if info["num_running_reqs"] == info["num_waiting_reqs"] == 0 and info["locked_pages"] <= info["session_pinned_pages"]:
                break
            time.sleep(0.1)
        time.sleep(2 * engine.args.session_timeout + 1)  # the reaper (every timeout / 2) closes abandoned sessions
        info = http.get("/get_server_info").json()
        health = http.get("/health").status_code
    server.stop()
    engine.shutdown()
    warm = [mb for t, mb in rss_samples if t >= 0.1 * 60 * args.minutes] or [rss_mb()]
    growth = warm[-1] - warm[0]
    total = sum(soak.counts.values())
    checks.append(("every request answered correctly or cleanly refused", not soak.failures,
                   f"{len(soak.failures)} failures" + (f", first: {soak.failures[0]}" if soak.failures else "")))
    checks.append(("free + evictable + locked == total, nothing locked",
                   info["free_pages"] + info["evictable_pages"] + info["locked_pages"] == info["total_pages"]
                   and info["locked_pages"] == 0, f"{info['free_pages']} + {info['evictable_pages']} + "
                                                  f"{info['locked_pages']} of {info['total_pages']} "
                                                  f"({info['session_pinned_pages']} pinned by sessions)"))
    checks.append(("no compilation after warm-up", info["compilations_after_warmup"] == 0,
                   str(info["compilations_after_warmup"])))
    checks.append((f"RSS growth after warm-up < {args.max_rss_growth_mb:.0f} MB", growth < args.max_rss_growth_mb,
                   f"{growth:+.1f} MB ({warm[0]:.0f} -> {warm[-1]:.0f})"))
    checks.append(("healthy at the end", health == 200, str(health)))
    print(f"soak: {args.minutes:.1f} min, {args.clients} clients, {total} requests, pool {args.pool} tokens, "
          f"{info['num_retractions']} retractions, {os.cpu_count()} CPUs")
    print("\n| kind | count | p50 s | p99 s |\n|---|---|---|---|")
    for kind, times in sorted(soak.latency.items()):
        times.sort()
        print(f"| {kind} | {len(times)} | {statistics.median(times):.3f} | {times[int(0.99 * (len(times) - 1))]:.3f} |")
    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    print("soak: ok" if all(ok for _, ok, _ in checks) else "soak: FAILED")
    tmp.cleanup()
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
