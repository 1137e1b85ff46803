"""Decode tokens/s at concurrency 1 / 8 / 32 on the bundled SmolLM2 (or `--model-path`).

    python scripts/bench_decode.py --concurrency 1 8 32 --output-len 64

For each concurrency C, C greedy requests with distinct ~20-token prompts stream
`--output-len` tokens each (ignore_eos), all at once. Decode throughput is the tokens that
arrive after each request's first one, over the time from the last first token (every
request decoding) to the last token; single-stream latency is its inverse at C = 1. A
warm-up round runs first, so no compilation is timed.

`--url URL` measures any OpenAI-compatible server instead (streamed /v1/completions with
the same prompts and lengths; llama.cpp's `llama-server`, or `python -m jaxserve serve`):
the same client for every server, so their ratios mean something. `--engine-src DIR`
imports jaxserve from another checkout (a `git worktree` of an older commit) for a
before / after comparison in one session.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

WORDS = ("river mountain lantern copper garden violet thunder marble harbor velvet meadow crystal falcon "
         "ember willow canyon silver orchard compass").split()


def prompts(count: int) -> list[str]:
    """Distinct prompts of about 20 tokens (no shared prefix beyond the instruction)."""
    return [f"Write a story about the {WORDS[i % len(WORDS)]} and the {WORDS[(7 * i + 3) % len(WORDS)]} "
            f"number {i}:" for i in range(count)]


async def engine_round(engine, concurrency: int, output_len: int) -> list[list[float]]:
    """Token arrival times of each request (one list per request)."""
    params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}

    async def one(prompt: str) -> list[float]:
        times, seen = [], 0
        async for chunk in await engine.async_generate(prompt, params, stream=True):
            done = chunk["meta_info"]["completion_tokens"]
            times += [time.perf_counter()] * (done - seen)
            seen = done
        return times

    return await asyncio.gather(*(one(p) for p in prompts(concurrency)))


async def http_round(url: str, model: str, concurrency: int, output_len: int) -> list[list[float]]:
    import httpx

    body = {"model": model, "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True}

    async def one(client, prompt: str) -> list[float]:
        times = []
        async with client.stream("POST", "/v1/completions", json={**body, "prompt": prompt}) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    times.append(time.perf_counter())
        return times

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return await asyncio.gather(*(one(client, p) for p in prompts(concurrency)))


def throughput(times: list[list[float]]) -> float:
    """Decode tokens/s once every request has its first token."""
    start = max(t[0] for t in times)
    end = max(t[-1] for t in times)
    tokens = sum(sum(1 for x in t if x > start) for t in times)
    return tokens / (end - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per concurrency; the best is reported")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", default="none", help="none | int8 | w8a16 | fp8 | gguf (weights/quantization.py)")
    parser.add_argument("--url", default=None, help="an OpenAI-compatible server to measure instead")
    parser.add_argument("--model", default="default", help="the model name to send with --url")
    parser.add_argument("--engine-src", default=None, help="import jaxserve from this checkout instead")
    parser.add_argument("--label", default=None, help="the name of this row in the table")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.output_len, args.repeats = [1, 4], 8, 1
    if args.engine_src:
        sys.path.insert(0, args.engine_src)
    engine = None
    if args.url is None:
        import jaxserve

        engine = jaxserve.Engine(args.model_path, dtype=args.dtype, quantization=args.quantization,
                                 max_running_requests=max(args.concurrency),
                                 context_length=256, max_prefill_tokens=1024, chunked_prefill_size=1024)

    def run(concurrency: int) -> list[list[float]]:
        if engine is not None:
            return asyncio.run(engine_round(engine, concurrency, args.output_len))
        return asyncio.run(http_round(args.url, args.model, concurrency, args.output_len))

    default = f"jaxserve {args.dtype} {args.quantization}" + (f" {args.engine_src}" if args.engine_src else "")
    label = args.label or args.url or default
    rows = []
    try:
        for concurrency in args.concurrency:
            run(concurrency)  # warm-up: prompts of new lengths, first use of each bucket
            best = max(throughput(run(concurrency)) for _ in range(args.repeats))
            rows.append((concurrency, best))
    finally:
        if engine is not None:
            engine.shutdown()
    print("| server | concurrency | decode tok/s | ms/token per stream |")
    print("|---|---|---|---|")
    for concurrency, tps in rows:
        print(f"| {label} | {concurrency} | {tps:.1f} | {1000 * concurrency / tps:.1f} |")
    print("decode tok/s " + json.dumps({str(c): round(t, 2) for c, t in rows}))


if __name__ == "__main__":
    main()
