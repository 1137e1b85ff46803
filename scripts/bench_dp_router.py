"""Data parallelism behind SGLang's router: cache_aware against round_robin routing.

    python scripts/bench_dp_router.py --dp-size 2 --conversations 8 --turns 4

For each policy, a fresh `python -m jaxserve serve --dp-size D --router-policy P` (cold
caches) serves the same multi-turn workload: every conversation is a long document
(its own, ~300 tokens) behind a system prompt that all of them share, then `--turns`
questions; each turn's prompt is the whole conversation so far. Conversations run
concurrently, turns within one in order. Reported per policy: wall time, requests/s,
output tokens/s, the cache hit rate (cached prompt tokens / prompt tokens, from each
response's `meta_info`), and the time to first token (streamed /generate; mean and p90).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import httpx

SYSTEM = ("You are a careful assistant for a library. Answer questions about the document the user "
          "gives, quote it when you can, and say when the document does not contain the answer. ") * 3
WORDS = ("river mountain lantern copper garden violet thunder marble harbor velvet meadow crystal falcon "
         "ember willow canyon silver orchard compass beacon").split()


def document(i: int) -> str:
    words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(220)]
    return f"Document {i}: " + " ".join(words)


def start(policy: str, args) -> tuple[subprocess.Popen, str]:
    port = 31000 + os.getpid() % 1000
    flags = ["--dp-size", str(args.dp_size), "--router-policy", policy, "--port", str(port),
             "--max-running-requests", "8", "--context-length", "2048", "--log-level", "warning"]
    if args.model_path:
        flags += ["--model-path", args.model_path]
    proc = subprocess.Popen([sys.executable, "-m", "jaxserve", "serve", *flags], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited during start-up"
        try:
            workers = httpx.get(url + "/get_loads", timeout=2).json()["workers"]
            if len(workers) == args.dp_size and all(w["load"] >= 0 for w in workers):
                return proc, url
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    raise TimeoutError("the server did not start")


async def turn(client, text: str, output_len: int) -> dict:
    body = {"text": text, "stream": True, "sampling_params": {"max_new_tokens": output_len, "temperature": 0,
                                                                "ignore_eos": True}}
    start, first, last = time.perf_counter(), None, None
    async with client.stream("POST", "/generate", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            first = first or time.perf_counter()
            last = json.loads(line[5:])
    meta = last["meta_info"]
    return {"ttft": first - start, "text": last["text"], "prompt": meta["prompt_tokens"],
            "cached": meta["cached_tokens"], "output": meta["completion_tokens"]}


async def workload(url: str, args) -> dict:
    async def conversation(client, i: int) -> list[dict]:
        history, results = f"{SYSTEM}\nUser: {document(i)}\n", []
        for t in range(args.turns):
            history += f"User: Question {t + 1} about document {i}: what comes after word {t * 5}?\nAssistant:"
            result = await turn(client, history, args.output_len)
            history += result["text"] + "\n"
            results.append(result)
        return results

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        per_conv = await asyncio.gather(*(conversation(client, i) for i in range(args.conversations)))
        wall = time.perf_counter() - start
    turns = [r for conv in per_conv for r in conv]
    ttfts = sorted(r["ttft"] for r in turns)
    return {"wall_s": round(wall, 2), "requests_per_s": round(len(turns) / wall, 3),
            "output_tok_per_s": round(sum(r["output"] for r in turns) / wall, 2),
            "cache_hit_rate": round(sum(r["cached"] for r in turns) / sum(r["prompt"] for r in turns), 4),
            "ttft_mean_s": round(statistics.mean(ttfts), 3), "ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp-size", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"])
    parser.add_argument("--model-path", default=None)
    args = parser.parse_args()
    results = {}
    for policy in args.policies:
        proc, url = start(policy, args)
        try:
            asyncio.run(warm(url, args))
            results[policy] = asyncio.run(workload(url, args))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
        print(json.dumps({"policy": policy, **results[policy]}), flush=True)
    if {"cache_aware", "round_robin"} <= set(results):
        ca, rr = results["cache_aware"], results["round_robin"]
        print(json.dumps({"cache_aware_over_round_robin": {
            "throughput": round(ca["output_tok_per_s"] / rr["output_tok_per_s"], 2),
            "cache_hit_rate": round(ca["cache_hit_rate"] / max(rr["cache_hit_rate"], 1e-9), 2),
            "ttft_mean": round(ca["ttft_mean_s"] / rr["ttft_mean_s"], 2)}}))


async def warm(url: str, args) -> None:
    """One request per replica on a prompt unlike the workload's, then empty caches."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(turn(client, f"Warm-up {i}: count to ten.", 4) for i in range(2 * args.dp_size)))
        await client.post("/flush_cache")


if __name__ == "__main__":
    main()
