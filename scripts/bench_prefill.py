"""Prefill rate of one long prompt alone against several prompts together.

    python scripts/bench_prefill.py --context-length 2048 --chunk 256 512
    python scripts/bench_prefill.py --engine-src /tmp/old-engine --chunk 256 512

Each run sends random token ids with `max_new_tokens=1` after a warm-up request and a
cache flush, so the time is the prefill: first one `--long-len` prompt alone, then
`--batch` prompts of `--short-len` tokens at once. Prints prompt tokens/s per chunk size
and repeat. `--engine-src DIR` imports jaxserve from another checkout (a `git worktree`
of an older commit) to compare engines in one session.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def timed(engine, prompts) -> float:
    engine.flush_cache()
    start = time.perf_counter()
    engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1, "temperature": 0})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--max-prefill-tokens", type=int, default=512)
    parser.add_argument("--chunk", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--long-len", type=int, default=1500)
    parser.add_argument("--short-len", type=int, default=560)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engine-src", default=None, help="import jaxserve from this checkout instead")
    parser.add_argument("--quick", action="store_true", help="a small run that checks the script works")
    args = parser.parse_args()
    if args.quick:  # a tiny random model (unless one is given) and small shapes: it only checks the script works
        args.context_length, args.max_prefill_tokens, args.chunk = 512, 128, [64]
        args.long_len, args.short_len, args.batch, args.repeats = 300, 100, 2, 1
        if args.model_path is None:
            import tempfile

            from bench_host_overhead import tiny_model

            args.model_path = tiny_model(tempfile.mkdtemp())
    if args.engine_src:
        sys.path.insert(0, args.engine_src)
    import jaxserve

    rng = np.random.default_rng(0)
    long_prompt = rng.integers(100, 49152, size=args.long_len).tolist()
    short = [rng.integers(100, 49152, size=args.short_len).tolist() for _ in range(args.batch)]
    print("| chunk | repeat | one long prompt tok/s | batch tok/s |\n|---|---|---|---|")
    for chunk in args.chunk:
        engine = jaxserve.Engine(args.model_path, context_length=args.context_length,
                                 max_prefill_tokens=args.max_prefill_tokens, chunked_prefill_size=chunk)
        try:
            engine.generate(input_ids=short[0][:64], sampling_params={"max_new_tokens": 1})
            for r in range(args.repeats):
                alone = args.long_len / timed(engine, long_prompt)
                together = args.batch * args.short_len / timed(engine, short)
                print(f"| {chunk} | {r + 1} | {alone:.0f} | {together:.0f} |", flush=True)
        finally:
            engine.shutdown()


if __name__ == "__main__":
    main()
