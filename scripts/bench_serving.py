"""Online serving benchmark for any OpenAI-compatible server (asyncio + httpx).

Sends streaming requests with a bounded request count and duration and reports throughput,
time to first token (TTFT), inter-token latency (ITL) and end-to-end latency as a markdown
table. Datasets:

  random         completions with random-word prompts and output lengths (`ignore_eos` fixes them)
  shared-prefix  chats of many users behind one long shared system prompt (radix-cache friendly)
  multi-turn     conversations whose turns go one after another, each resending the history

Example (against `python -m jaxserve serve` on the default port):

  python scripts/bench_serving.py --dataset shared-prefix --num-requests 64 --max-concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import time
from typing import Any, AsyncIterator

import httpx

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river garden music paper window engine cache token "
         "kernel page radix tree batch stream signal memory").split()


@dataclasses.dataclass
class Job:
    """One request to send: a completions prompt or chat messages, and how many tokens to ask for."""

    max_tokens: int
    prompt: str | None = None
    messages: list[dict] | None = None
    conversation: int | None = None  # multi-turn: which conversation, so the next turn can follow


@dataclasses.dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    itls: list[float] = dataclasses.field(default_factory=list)
    latency: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    error: str = ""


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(n, 1)))


def lengths(rng: random.Random, mean: int, ratio: float) -> int:
    return rng.randint(max(int(mean * ratio), 1), mean)


async def send(client: httpx.AsyncClient, args, job: Job) -> Result:
    """Stream one request; TTFT is the first chunk with text, ITL the gaps between later ones."""
    chat = job.messages is not None
    body: dict[str, Any] = {"model": args.model, "max_tokens": job.max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": args.temperature}
    if args.ignore_eos:
        body["ignore_eos"] = True
    body.update({"messages": job.messages} if chat else {"prompt": job.prompt})
    result, start = Result(ok=False), time.perf_counter()
    last = start
    try:
        async with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return result
            async for payload in _events(r.aiter_lines()):
                if "error" in payload:
                    result.error = str(payload["error"])
                    return result
                if payload.get("usage"):
                    usage = payload["usage"]
                    result.prompt_tokens, result.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                for choice in payload.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if piece:
                        now = time.perf_counter()
                        if not result.text:
                            result.ttft = now - start
                        else:
                            result.itls.append(now - last)
                        last, result.text = now, result.text + piece
        result.ok, result.latency = True, time.perf_counter() - start
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def _events(lines: AsyncIterator[str]) -> AsyncIterator[dict]:
    async for line in lines:
        if not line:
            continue
        if not line.startswith("data: "):
            raise httpx.DecodingError(f"unexpected line on the stream: {line[:80]!r}")
        if line == "data: [DONE]":
            return
        yield json.loads(line[len("data: "):])


def random_jobs(args, rng: random.Random) -> list[Job]:
    return [Job(lengths(rng, args.output_len, args.range_ratio), prompt=words(rng, lengths(rng, args.input_len,
                                                                                           args.range_ratio)))
            for _ in range(args.num_requests)]


def shared_prefix_jobs(args, rng: random.Random) -> list[Job]:
    system = "You are the help desk. Policy: " + words(rng, args.system_prompt_len)
    return [Job(lengths(rng, args.output_len, args.range_ratio),
                messages=[{"role": "system", "content": system},
                          {"role": "user", "content": f"User {i}: " + words(rng, lengths(rng, args.input_len,
                                                                                          args.range_ratio))}])
            for i in range(args.num_requests)]


class MultiTurn:
    """Conversations of `--turns` turns; a conversation's next turn is sent after its previous reply."""

    def __init__(self, args, rng: random.Random):
        self.args, self.rng = args, rng
        self.histories: list[list[dict]] = []
        self.turns_left: list[int] = []

    def first_jobs(self) -> list[Job]:
        n = max(1, self.args.num_requests // self.args.turns)
        self.histories = [[] for _ in range(n)]
        self.turns_left = [self.args.turns] * n
        return [self._next(c) for c in range(n)]

    def follow_up(self, job: Job, result: Result) -> Job | None:
        c = job.conversation
        self.histories[c] = job.messages + [{"role": "assistant", "content": result.text}]
        return self._next(c) if self.turns_left[c] > 0 and result.ok else None

    def _next(self, c: int) -> Job:
        self.turns_left[c] -= 1
        message = {"role": "user", "content": words(self.rng, lengths(self.rng, self.args.input_len,
                                                                      self.args.range_ratio))}
        return Job(lengths(self.rng, self.args.output_len, self.args.range_ratio),
                   messages=self.histories[c] + [message], conversation=c)


async def run(args) -> tuple[list[Result], float]:
    """Send the jobs (Poisson arrivals at --request-rate, at most --max-concurrency in flight)."""
    rng = random.Random(args.seed)
    multi = MultiTurn(args, rng) if args.dataset == "multi-turn" else None
    jobs = multi.first_jobs() if multi else (random_jobs if args.dataset == "random" else shared_prefix_jobs)(args, rng)
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results: list[Result] = []
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency)
    start = time.perf_counter()
    deadline = start + args.duration
    sent = 0
    pending = len(jobs)

    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=args.timeout, limits=limits) as client:
        if args.model is None:
            args.model = (await client.get("/v1/models")).json()["data"][0]["id"]
        gate = asyncio.Semaphore(args.max_concurrency)

        async def one(job: Job) -> None:
            nonlocal pending
            async with gate:
                result = await send(client, args, job)
            results.append(result)
            follow = multi.follow_up(job, result) if multi else None
            if follow is not None:
                pending += 1
                queue.put_nowait(follow)
            pending -= 1
            if pending == 0:
                queue.put_nowait(None)

        tasks = []
        while sent < args.num_requests and time.perf_counter() < deadline:
            job = await queue.get()
            if job is None:
                break
            tasks.append(asyncio.create_task(one(job)))
            sent += 1
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(round(q / 100 * (len(ordered) - 1))), len(ordered) - 1)]


def report(args, results: list[Result], elapsed: float) -> str:
    """A markdown table of the run."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft * 1e3 for r in ok if r.text]
    itl = [x * 1e3 for r in ok for x in r.itls]
    out_tokens = sum(r.completion_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    rows = [
        ("dataset", args.dataset), ("requests ok / sent", f"{len(ok)} / {len(results)}"),
        ("max concurrency", args.max_concurrency), ("duration (s)", f"{elapsed:.1f}"),
        ("request throughput (req/s)", f"{len(ok) / elapsed:.2f}"),
        ("output throughput (tok/s)", f"{out_tokens / elapsed:.1f}"),
        ("total throughput (tok/s)", f"{(in_tokens + out_tokens) / elapsed:.1f}"),
        ("mean prompt / output tokens", f"{in_tokens / max(len(ok), 1):.0f} / {out_tokens / max(len(ok), 1):.0f}"),
        ("prompt tokens from cache", f"{100 * cached / max(in_tokens, 1):.0f}%"),
        ("TTFT p50 / p99 (ms)", f"{percentile(ttft, 50):.0f} / {percentile(ttft, 99):.0f}"),
        ("ITL p50 / p99 (ms)", f"{percentile(itl, 50):.1f} / {percentile(itl, 99):.1f}"),
        ("E2E latency p50 / p99 (s)", f"{percentile([r.latency for r in ok], 50):.2f} / "
                                      f"{percentile([r.latency for r in ok], 99):.2f}"),
    ]
    errors = sorted({r.error for r in results if not r.ok})
    table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    return table + ("\n\nerrors: " + "; ".join(errors[:5]) if errors else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=["random", "shared-prefix", "multi-turn"], default="random")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--duration", type=float, default=300.0, help="stop sending new requests after this many seconds")
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    p.add_argument("--input-len", type=int, default=128, help="prompt length in words (about tokens)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths are uniform in [ratio*len, len]")
    p.add_argument("--system-prompt-len", type=int, default=512, help="shared-prefix: system prompt words")
    p.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (by default output lengths are fixed)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None, help="also write the summary and per-request numbers here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results, elapsed = asyncio.run(run(args))
    print(report(args, results, elapsed))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "elapsed": elapsed,
                       "results": [dataclasses.asdict(r) | {"text": None} for r in results]}, f, indent=1)
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
