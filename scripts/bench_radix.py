"""Time RadixCache match / insert / evict on a tree holding ~1M tokens.

Workloads (2k-token prompts, vocabulary 32k):
  random         independent random prompts: a wide, shallow tree;
  shared-prefix  16 system prompts (700 tokens) x 8 few-shot blocks (600 tokens) + a
                 unique 748-token question: a deep tree that splits inside pages.

Columns are microseconds per call (best of --repeats loops): a match of a cached prompt
given as an int32 array and as a Python list, a match of an unseen prompt, an insert of
a new prompt (shares its prefix in the shared workload), and evict() of 16 pages.

    python scripts/bench_radix.py            # ~1M tokens, prints a markdown table
    python scripts/bench_radix.py --quick    # small tree, a few seconds (run by tests)
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Iterator

import numpy as np

from jaxserve.memory import PageAllocator, RadixCache

PROMPT_LEN = 2048
VOCAB = 32000


def prompts(workload: str, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless prompts of the workload, each int32[PROMPT_LEN]."""
    systems = rng.integers(0, VOCAB, (16, 700), dtype=np.int32)
    shots = rng.integers(0, VOCAB, (16, 8, 600), dtype=np.int32)
    while True:
        if workload == "random":
            yield rng.integers(0, VOCAB, PROMPT_LEN, dtype=np.int32)
            continue
        s, k = rng.integers(16), rng.integers(8)
        question = rng.integers(0, VOCAB, PROMPT_LEN - 1300, dtype=np.int32)
        yield np.concatenate([systems[s], shots[s, k], question])


def per_call_us(fn: Callable[[np.ndarray], object], inputs: list, repeats: int) -> float:
    """Best-of-``repeats`` mean time of ``fn`` over ``inputs``, in microseconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for x in inputs:
            fn(x)
        best = min(best, (time.perf_counter_ns() - start) / len(inputs) / 1e3)
    return best


def bench(page_size: int, workload: str, tree_tokens: int, repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    num_new = 64
    pages_per_prompt = PROMPT_LEN // page_size
    # Room for a tree of tree_tokens plus the prompts inserted while timing.
    alloc = PageAllocator(tree_tokens // page_size + num_new * repeats * pages_per_prompt + 1)
    cache = RadixCache(alloc, page_size)

    def insert(tokens: np.ndarray) -> None:
        pages = alloc.alloc(pages_per_prompt)
        present = cache.insert(tokens, pages)
        alloc.free(pages[: present // page_size])

    source = prompts(workload, rng)
    cached: list[np.ndarray] = []
    for tokens in source:  # shared prompts add less than PROMPT_LEN each
        if cache.evictable_pages * page_size + PROMPT_LEN > tree_tokens:
            break
        insert(tokens)
        cached.append(tokens)
    held = cache.evictable_pages * page_size
    unseen = list(itertools.islice(prompts("random", rng), num_new))
    queries = [cached[i] for i in rng.permutation(len(cached))[:256]]
    for q in queries:  # split once, as a warm server would have, before timing
        cache.match_prefix(q)
    lists = [q.tolist() for q in queries]
    row = {
        "page_size": page_size, "workload": workload, "tree_tokens": held, "nodes": cache.num_nodes,
        "match_hit": per_call_us(cache.match_prefix, queries, repeats),
        "match_hit_list": per_call_us(cache.match_prefix, lists, repeats),
        "match_miss": per_call_us(cache.match_prefix, unseen, repeats),
    }
    # Inserts (with their alloc / free) of prompts never seen, so each loop takes new ones.
    batches = [list(itertools.islice(source, num_new)) for _ in range(repeats)]
    row["insert"] = min(per_call_us(insert, batch, 1) for batch in batches)
    row["evict16"] = per_call_us(cache.evict, [16] * 32, repeats)  # 32 leaves a loop
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~20k-token tree, one repeat")
    parser.add_argument("--tokens", type=int, default=1 << 20, help="tokens to cache")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokens, repeats = (20_000, 1) if args.quick else (args.tokens, args.repeats)

    print("| page size | workload | tree tokens | nodes | match hit (int32) | "
          "match hit (list) | match miss | insert new | evict 16 pages |")
    print("|---|---|---|---|---|---|---|---|---|")
    for page_size in (1, 16):
        for workload in ("random", "shared-prefix"):
            r = bench(page_size, workload, tokens, repeats)
            print(f"| {r['page_size']} | {r['workload']} | {r['tree_tokens']:,} | {r['nodes']:,} | "
                  f"{r['match_hit']:.1f} us | {r['match_hit_list']:.1f} us | "
                  f"{r['match_miss']:.1f} us | {r['insert']:.1f} us | {r['evict16']:.0f} us |",
                  flush=True)


if __name__ == "__main__":
    main()
