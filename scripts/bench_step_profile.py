"""Where the milliseconds of one decode step go, per weight format.

    python scripts/bench_step_profile.py --batch 1 8 32 --formats float32:none float32:int8 float32:gguf

For each format (`DTYPE:QUANTIZATION`) the bundled SmolLM2 is loaded and three jitted
programs run on a decode batch of B sequences with 64 tokens of context each: the
decoder (embedding, 30 layers with paged attention, final norm), the LM head alone, and
the two together (the engine's forward), the KV pool donated as in the engine. Median of
`--repeats` runs after a warm-up; the engine's sampler and host work come on top (compare
`bench_decode.py`'s ms per step).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import numpy as np


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - start)
    return 1000 * statistics.median(runs)


class Stepper:
    """Calls a jitted `fn(params, batch, k, v) -> (out, k, v)` that donates the KV pool, as
    the engine does (without donation every call would copy the pool)."""

    def __init__(self, fn, params, batch, k, v):
        self.fn, self.params, self.batch, self.kv = fn, params, batch, (k, v)

    def __call__(self):
        out, *self.kv = self.fn(self.params, self.batch, *self.kv)
        return out


def profile(dtype: str, quantization: str, batches: list[int], repeats: int) -> list[dict]:
    from flax import nnx

    from jaxserve.models.batch import ForwardBatch
    from jaxserve.weights import load

    model = load(None, dtype=dtype, quantization=quantization, with_tokenizer=False)
    graphdef, params = model.graphdef, model.params
    weights_mb = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20

    @functools.partial(jax.jit, donate_argnums=(2, 3))
    def decoder(params, batch, k, v):
        return nnx.merge(graphdef, params)(batch, k, v)

    @jax.jit
    def head(params, hidden):
        return nnx.merge(graphdef, params).logits(hidden)

    @functools.partial(jax.jit, donate_argnums=(2, 3))
    def both(params, batch, k, v):
        m = nnx.merge(graphdef, params)
        hidden, k, v = m(batch, k, v)
        return m.logits(hidden), k, v

    rows = []
    for b in batches:
        pages_per_seq = 64 // model.page_size + 1
        k, v = model.new_kv_cache(b * pages_per_seq + 1)
        seqs = [([7], 64, np.arange(1 + i * pages_per_seq, 1 + (i + 1) * pages_per_seq)) for i in range(b)]
        batch = ForwardBatch.build(seqs, model.page_size, num_tokens=b, max_seqs=b)
        run_decoder = Stepper(decoder, params, batch, k, v)
        hidden = run_decoder()
        rows.append({"format": f"{dtype}:{quantization}", "batch": b, "weights_mb": weights_mb,
                     "decoder_ms": timed(run_decoder, repeats=repeats),
                     "head_ms": timed(head, params, hidden, repeats=repeats),
                     "forward_ms": timed(Stepper(both, params, batch, *run_decoder.kv), repeats=repeats)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--formats", nargs="+", default=["float32:none", "float32:int8", "float32:gguf"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="one format, batch 1, few runs (the test suite)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.formats, args.repeats = [1], ["float32:int8"], 2
    print("| format | weights MB | batch | decoder ms | LM head ms | forward ms |")
    print("|---|---|---|---|---|---|")
    for fmt in args.formats:
        dtype, quantization = fmt.split(":")
        for r in profile(dtype, quantization, args.batch, args.repeats):
            print(f"| {r['format']} | {r['weights_mb']:.0f} | {r['batch']} | {r['decoder_ms']:.1f} | "
                  f"{r['head_ms']:.1f} | {r['forward_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
