"""The hierarchical KV cache on a multi-turn workload whose reuse distance exceeds the
device pool, side by side in one run.

    python scripts/bench_hicache.py --conversations 8 --turns 4 --system 320 --pool 1024

Three parts, one process, SmolLM2 unless `--model-path` (`--quick`: a tiny random model,
to check the script works):

1. **Multi-turn**: `--conversations` chats, each a `--system`-token prefix, then turns of
   `--user` new tokens and a `--reply`-token answer, sent round-robin (one request at a
   time), so a chat comes back only after all the others have gone through a device pool
   of `--pool` tokens. Three engines: hierarchical cache off; on (host pool `--ratio`
   times the device pool); and host tier tiny with the file storage tier behind it.
   Reports throughput (prompt + output tokens per second), TTFT p50 / p99 and the share
   of prompt tokens served from each tier (device, host, storage) or computed.
2. **Bandwidth**: pages device -> host (jitted gather + copy to host memory) and
   host -> device (host read + upload + jitted scatter), `--bandwidth-pages` at a time.
3. **Break-even**: for each prompt length, TTFT of a one-token request when it is
   computed, loaded from the host tier, or read from storage (page files, with the
   `wait_complete` prefetch policy); the shortest length where a storage hit beats
   computing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

import jaxserve


def engine_args(args, **kw) -> dict:
    base = dict(max_running_requests=8, max_prefill_tokens=args.chunk, chunked_prefill_size=args.chunk,
                context_length=args.context, max_total_tokens=args.pool)
    return {**base, **kw}


def ttft(engine, ids, max_new_tokens: int) -> tuple[float, dict]:
    """Seconds to the first streamed chunk, and the final meta_info."""
    start = time.perf_counter()
    first, meta = None, None
    for chunk in engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": max_new_tokens,
                                                                 "ignore_eos": True}, stream=True):
        if first is None:
            first = time.perf_counter() - start
        meta = chunk["meta_info"]
    return first, meta


def multi_turn(engine, args) -> dict:
    rng = np.random.default_rng(0)
    chats = [rng.integers(100, 40000, args.system).tolist() for _ in range(args.conversations)]
    ttfts, tiers = [], {"device": 0, "host": 0, "storage": 0}
    prompt_tokens = output_tokens = cached = 0
    start = time.perf_counter()
    for _ in range(args.turns):
        for i, chat in enumerate(chats):
            ids = chat + rng.integers(100, 40000, args.user).tolist()
            seconds, meta = ttft(engine, ids, args.reply)
            ttfts.append(seconds)
            prompt_tokens += meta["prompt_tokens"]
            output_tokens += meta["completion_tokens"]
            cached += meta["cached_tokens"]
            for tier, n in (meta.get("cached_tokens_details") or {"device": meta["cached_tokens"]}).items():
                tiers[tier] += n
            chats[i] = ids + rng.integers(100, 40000, args.reply).tolist()  # the reply, as the next turn sees it
    wall = time.perf_counter() - start
    ttfts.sort()
    return {"tok/s": (prompt_tokens + output_tokens) / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], "wall": wall,
            **{f"{t} %": 100 * n / prompt_tokens for t, n in tiers.items()},
            "computed %": 100 * (prompt_tokens - cached) / prompt_tokens}


def bandwidth(engine, pages: int, repeats: int) -> tuple[float, float]:
    """(device -> host, host -> device) GB/s over `pages` pages, median of `repeats`."""
    hicache = engine.scheduler.hicache
    host, io = hicache.host, hicache.io
    device_pages = np.arange(1, pages + 1, dtype=np.int32)
    host_pages = np.arange(1, pages + 1, dtype=np.int32)
    nbytes = pages * host.page_bytes

    def d2h():
        start = time.perf_counter()
        at = 0
        for count, k, v in io.gather(device_pages):
            host.write(host_pages[at : at + count], np.asarray(k), np.asarray(v))
            at += count
        return time.perf_counter() - start

    def h2d():
        import jax

        start = time.perf_counter()
        for at, n in io.pieces(pages):
            io.scatter(device_pages[at : at + n], *host.read(host_pages[at : at + n]))
        jax.block_until_ready(io.runner.k_cache)
        return time.perf_counter() - start

    # on the scheduler thread, between steps (the engine is idle): pages 1..n are scratch
    # here; one untimed round first touches the host pages
    engine.scheduler.call(d2h), engine.scheduler.call(h2d)
    down = [engine.scheduler.call(d2h) for _ in range(repeats)]
    up = [engine.scheduler.call(h2d) for _ in range(repeats)]
    return nbytes / statistics.median(down) / 1e9, nbytes / statistics.median(up) / 1e9


def break_even(engine, lengths: list[int], repeats: int) -> list[tuple[int, float, float, float]]:
    """Per length: TTFT computed, from the host tier, from storage (medians)."""
    rows = []
    rng = np.random.default_rng(1)
    for length in lengths:
        times = {"compute": [], "host": [], "storage": []}
        for _ in range(repeats):
            ids = rng.integers(100, 40000, length).tolist()  # never seen: computed, and written through
            engine.flush_cache()
            times["compute"].append(ttft(engine, ids, 1)[0])
            engine.scheduler.call(lambda: engine.scheduler.hicache.poll(wait=True))
            engine.scheduler.call(engine.scheduler.cache.flush)  # device only: the host keeps it
            seconds, meta = ttft(engine, ids, 1)
            assert meta["cached_tokens_details"]["host"] > 0, meta
            times["host"].append(seconds)
            engine.flush_cache()  # device and host: only the page files remain
            seconds, meta = ttft(engine, ids, 1)
            assert meta["cached_tokens_details"]["storage"] > 0, meta
            times["storage"].append(seconds)
        rows.append((length, *(statistics.median(times[k]) for k in ("compute", "host", "storage"))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system", type=int, default=320)
    parser.add_argument("--user", type=int, default=32)
    parser.add_argument("--reply", type=int, default=16)
    parser.add_argument("--pool", type=int, default=1024, help="device pool, tokens")
    parser.add_argument("--ratio", type=float, default=4.0)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--context", type=int, default=640)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--bandwidth-pages", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    if args.quick:
        from bench_host_overhead import tiny_model

        args.model_path = tiny_model(tmp.name)
        args.conversations, args.turns, args.system, args.pool, args.chunk, args.context = 4, 2, 64, 256, 64, 256
        args.lengths, args.bandwidth_pages, args.repeats = [32, 128], 8, 1
    path = args.model_path
    print(f"model {path or 'SmolLM2-135M-Instruct (bundled)'}; {args.conversations} chats x {args.turns} turns, "
          f"system {args.system}, user {args.user}, reply {args.reply} tokens; device pool {args.pool} tokens; "
          f"{os.cpu_count()} CPUs")
    page_bytes, gbps = None, (0.0, 0.0)
    results = {}
    configs = {
        "off": {},
        "L2": dict(enable_hierarchical_cache=True, hicache_ratio=args.ratio),
        "L3 (tiny L2)": dict(enable_hierarchical_cache=True, hicache_size=None, hicache_storage_backend="file",
                             hicache_storage_dir=os.path.join(tmp.name, "kv"),
                             hicache_storage_prefetch_policy="wait_complete"),
    }
    for name, kw in configs.items():
        if name.startswith("L3"):  # room on the host for one chat's prompt and a little more
            longest = args.system + args.turns * (args.user + args.reply)
            kw["hicache_size"] = (longest // 16 + 3) * page_bytes / (1 << 30)
        engine = jaxserve.Engine(path, **engine_args(args, **kw))
        try:
            if page_bytes is None:
                page_bytes = kv_page_bytes(engine)
            results[name] = multi_turn(engine, args)
            if name == "L2":
                gbps = bandwidth(engine, args.bandwidth_pages, args.repeats)
        finally:
            engine.shutdown()
    print("\n| hierarchical cache | tok/s | TTFT p50 ms | TTFT p99 ms | device % | host % | storage % | computed % |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tok/s']:.0f} | {1e3 * r['ttft_p50']:.1f} | {1e3 * r['ttft_p99']:.1f} | "
              f"{r['device %']:.1f} | {r['host %']:.1f} | {r['storage %']:.1f} | {r['computed %']:.1f} |")
    print(f"throughput ratio L2/off {results['L2']['tok/s'] / results['off']['tok/s']:.2f}, "
          f"L3/off {results['L3 (tiny L2)']['tok/s'] / results['off']['tok/s']:.2f}")
    print(f"\nbandwidth ({args.bandwidth_pages} pages of {page_bytes / 1024:.0f} KiB): device->host {gbps[0]:.2f} GB/s, "
          f"host->device {gbps[1]:.2f} GB/s")
    longest = max(args.lengths) + 64
    engine = jaxserve.Engine(path, **engine_args(args, max_total_tokens=max(args.pool, longest), context_length=longest,
                                                 enable_hierarchical_cache=True,
                                                 hicache_storage_backend="file",
                                                 hicache_storage_dir=os.path.join(tmp.name, "kv-break-even"),
                                                 hicache_storage_prefetch_policy="wait_complete"))
    try:
        rows = break_even(engine, args.lengths, args.repeats)
    finally:
        engine.shutdown()
    print("\n| prompt tokens | TTFT computed ms | TTFT host hit ms | TTFT storage hit ms |")
    print("|---|---|---|---|")
    for length, compute, host, storage in rows:
        print(f"| {length} | {1e3 * compute:.1f} | {1e3 * host:.1f} | {1e3 * storage:.1f} |")
    wins = [length for length, compute, _, storage in rows if storage < compute]
    print(f"break-even: a storage hit beats recompute from {wins[0] if wins else 'no tested'} prompt tokens")
    tmp.cleanup()


def kv_page_bytes(engine) -> int:
    cfg = engine.scheduler.runner.model.config
    itemsize = np.dtype(engine.scheduler.runner.model.dtype).itemsize
    return 2 * cfg.num_layers * engine.scheduler.runner.page_size * cfg.num_kv_heads * cfg.head_dim * itemsize


if __name__ == "__main__":
    main()
