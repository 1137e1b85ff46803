"""Prefix sharing: many requests behind one long system prompt, radix cache on vs off.

    python scripts/bench_prefix.py --num-requests 32 --system-len 1024 --question-len 32 --output-len 16

All requests are sent at once (streaming, in-process) after one request has warmed the
shared prefix; reports throughput and time to first token for each setting and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np


async def measure(engine, prompts, output_len: int) -> tuple[float, list[float], int]:
    params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}

    async def one(ids):
        start = time.perf_counter()
        ttft, cached = None, 0
        async for chunk in await engine.async_generate(input_ids=ids, sampling_params=params, stream=True):
            if ttft is None and chunk["meta_info"]["completion_tokens"] > 0:
                ttft = time.perf_counter() - start
            cached = chunk["meta_info"]["cached_tokens"]
        return ttft, cached

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - start, [t for t, _ in results], sum(c for _, c in results)


def run(disable_radix_cache: bool, system, questions, args) -> tuple[float, list[float], int]:
    import jaxserve

    engine = jaxserve.Engine(args.model_path, disable_radix_cache=disable_radix_cache,
                             max_running_requests=args.max_running_requests, max_prefill_tokens=args.max_prefill_tokens,
                             chunked_prefill_size=args.chunked_prefill_size,
                             compilation_cache_dir=args.compilation_cache_dir,
                             context_length=len(system) + args.question_len + args.output_len + 16)
    try:
        engine.generate(input_ids=system + questions[0], sampling_params={"max_new_tokens": 1})  # warm the prefix
        return asyncio.run(measure(engine, [system + q for q in questions], args.output_len))
    finally:
        engine.shutdown()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    # None: the engine's defaults for the backend
    parser.add_argument("--max-running-requests", type=int, default=None)
    parser.add_argument("--max-prefill-tokens", type=int, default=None)
    parser.add_argument("--chunked-prefill-size", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    args.compilation_cache_dir = str(Path(tmp.name) / "jax-cache")  # the second engine compiles nothing
    if args.quick:  # a tiny random model and small shapes: it only checks the script works
        args.num_requests, args.system_len, args.question_len, args.output_len = 4, 64, 8, 2
        args.max_running_requests, args.max_prefill_tokens, args.chunked_prefill_size = 4, 64, 64
        if args.model_path is None:
            from bench_host_overhead import tiny_model  # scripts/ is on the path when run as a script

            args.model_path = tiny_model(tmp.name)
    rng = np.random.default_rng(0)
    system = rng.integers(100, 49152, size=args.system_len).tolist()
    questions = [rng.integers(100, 49152, size=args.question_len).tolist() for _ in range(args.num_requests)]
    rows = {name: run(off, system, questions, args) for name, off in (("radix cache on", False), ("radix cache off", True))}
    tokens = args.num_requests * (args.system_len + args.question_len + args.output_len)
    print(f"\n{args.num_requests} requests: {args.system_len}-token shared system prompt + "
          f"{args.question_len}-token question, {args.output_len} output tokens\n")
    print("| setting | seconds | tokens/s (in+out) | TTFT p50 (s) | TTFT p99 (s) | cached tokens |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, ttfts, cached) in rows.items():
        print(f"| {name} | {seconds:.2f} | {tokens / seconds:.0f} | {np.percentile(ttfts, 50):.3f} | "
              f"{np.percentile(ttfts, 99):.3f} | {cached} |")
    on, off = rows["radix cache on"], rows["radix cache off"]
    print(f"\nthroughput ratio on/off: {off[0] / on[0]:.2f}x; TTFT p50 ratio off/on: "
          f"{np.percentile(off[1], 50) / np.percentile(on[1], 50):.2f}x")


if __name__ == "__main__":
    main()
