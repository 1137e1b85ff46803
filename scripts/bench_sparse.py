"""Quest sparse decode attention on the bundled SmolLM2: speed, retrieval, fidelity.

    python scripts/bench_sparse.py speed --contexts 2048 4096 8192 --batch 8 --budgets 512 1024
    python scripts/bench_sparse.py passkey --lengths 1024 2048 4096 8000 --depths 0.1 0.5 0.9 --budgets 512 1024
    python scripts/bench_sparse.py fidelity --length 4096 --steps 32 --budgets 512 1024
    python scripts/bench_sparse.py coverage --length 8000 --budgets 512 1024

`speed`: one decode step of B sequences at context C (the model run directly over a pool
of random keys and values, median of `--repeats`), dense and with each token budget, and
the share of the KV tokens it read. `passkey`: a 5-digit key hidden at a depth of a
filler text of L tokens, asked for at the end; the share of (length, depth) cells whose
greedy answer contains the key, per budget. `fidelity`: the model is run directly (no
engine) on a long prompt (a passkey prompt, or the start of `--text`), teacher-forced
with dense greedy's continuation: mean KL(dense || sparse) and top-1 agreement of
next-token distributions over the decode steps.
`coverage`: at the first decode step after such a prompt, the share of each query head's
dense attention on the pages Quest keeps, against the best pages of the same number.
`passkey` runs an engine per config; sequences shorter than the budget are dense,
`--min-context` makes shorter ones dense too.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
QUESTION = "What is the pass key? The pass key is"


def make_engine(budget: int | None, context: int, batch: int, min_context: int):
    import jaxserve

    sparse = {} if budget is None else dict(sparse_attention="quest", sparse_attention_token_budget=budget,
                                            sparse_attention_min_context=min_context)
    return jaxserve.Engine(None, context_length=context + 64, max_total_tokens=batch * (context + 64) + 64,
                           max_running_requests=batch, **sparse)


def label(budget: int | None) -> str:
    return "dense" if budget is None else f"quest {budget}"


def speed(args) -> None:
    """Decode steps of B sequences at context C over a pool of random keys and values, run
    through the model directly (the prefill of B x C tokens is not part of a decode step,
    and on CPU it would take longer than the measurement)."""
    import jax
    from flax import nnx

    from jaxserve.models import ForwardBatch
    from jaxserve.weights import load
    from pallas_kernels.sparse import SparseAttention

    model = load(None, dtype="float32", quantization="auto", with_tokenizer=False)
    cfg, page = model.config, model.page_size

    @functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3, 4, 5))
    def step(sparse, batch, params, k, v, bounds):
        m = nnx.merge(model.graphdef, params)
        hidden, k, v, bounds, read = m(batch, k, v, bounds, sparse)
        return (m.logits(hidden), read), k, v, bounds

    print("| context | batch | attention | ms per step | decode tok/s | KV read / dense | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for context in args.contexts:
        width = -(-(context + 1) // page)
        num_pages = args.batch * width + 1
        seqs = [([7], context, np.arange(1 + i * width, 1 + (i + 1) * width)) for i in range(args.batch)]
        batch = ForwardBatch.build(seqs, page, num_tokens=args.batch, max_seqs=args.batch)
        base = None
        for budget in [None, *args.budgets]:
            sparse = None if budget is None else SparseAttention(budget, args.min_context)
            shape = (cfg.num_layers, num_pages, page, cfg.num_kv_heads, cfg.head_dim)
            k = jax.random.normal(jax.random.key(0), shape)
            v = jax.random.normal(jax.random.key(1), shape)
            bounds = (k.min(axis=2), k.max(axis=2))
            out = step(sparse, batch, model.params, k, v, bounds)
            jax.block_until_ready(out)
            runs = []
            for _ in range(args.repeats):
                begin = time.perf_counter()
                out = step(sparse, batch, model.params, *out[1:])
                jax.block_until_ready(out)
                runs.append(time.perf_counter() - begin)
            ms = 1000 * float(np.median(runs))
            base = base or ms
            read = float(np.asarray(out[0][1]).sum()) / (args.batch * cfg.num_layers * (context + 1))
            print(f"| {context} | {args.batch} | {label(budget)} | {ms:.1f} | {1000 * args.batch / ms:.1f} | "
                  f"{read:.3f} | {base / ms:.2f}x |", flush=True)
            del out, k, v, bounds


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    filler = tokenizer.encode(FILLER * (length // 20 + 2), add_special_tokens=False)
    needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)
    question = tokenizer.encode(" " + QUESTION, add_special_tokens=False)
    body = length - len(needle) - len(question)
    at = int(body * depth)
    return filler[:at] + needle + filler[at:body] + question


def long_prompt(tokenizer, args) -> list[int]:
    """`--length` tokens: the start of `--text` (a file of natural text), or a passkey prompt."""
    if args.text is None:
        return passkey_prompt(tokenizer, args.length, 0.5, 51234)
    with open(args.text, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(), add_special_tokens=False)[:args.length]
    if len(ids) < args.length:
        raise SystemExit(f"{args.text} has only {len(ids)} tokens, fewer than --length {args.length}")
    return ids


def direct(model):
    """A jitted step of the model run without an engine, `(sparse, batch, k, v, bounds) ->
    (last token's logits, k, v, bounds)`, and `prefill(prompt, pages)`: the empty pool and
    bounds after the prompt in chunks of 512 tokens (dense), with the last logits."""
    import jax
    from flax import nnx

    from jaxserve.models import ForwardBatch
    from pallas_kernels.sparse import new_bounds

    cfg, page = model.config, model.page_size

    @functools.partial(jax.jit, static_argnums=(0,))
    def run(sparse, batch, params, k, v, bounds):
        m = nnx.merge(model.graphdef, params)
        hidden, k, v, bounds, _ = m(batch, k, v, bounds, sparse)
        return m.logits(hidden[-1:]), k, v, bounds

    def step(sparse, batch, k, v, bounds):
        return run(sparse, batch, model.params, k, v, bounds)

    def prefill(prompt, pages):
        k, v = model.new_kv_cache(len(pages) + 1)
        bounds = tuple(b.reshape(cfg.num_layers, k.shape[1], cfg.num_kv_heads, cfg.head_dim)
                       for b in new_bounds(cfg.num_layers * k.shape[1], cfg.num_kv_heads, cfg.head_dim))
        for start in range(0, len(prompt), 512):
            batch = ForwardBatch.build([(prompt[start:start + 512], start, pages)], page)
            logits, k, v, bounds = step(None, batch, k, v, bounds)
        return logits, k, v, bounds

    return step, prefill


def passkey(args) -> None:
    rng = np.random.default_rng(1)
    cells = [(n, d, int(rng.integers(10000, 99999))) for n in args.lengths for d in args.depths]
    results = {}
    for budget in [None, *args.budgets]:
        engine = make_engine(budget, max(args.lengths), 1, args.min_context)
        try:
            tok = engine.tokenizer
            out = []
            for n, d, key in cells:
                r = engine.generate(input_ids=passkey_prompt(tok, n, d, key),
                                    sampling_params={"temperature": 0, "max_new_tokens": 8})
                out.append((str(key) in r["text"], r["output_ids"], r["meta_info"].get("attention_sparsity_ratio", 0)))
        finally:
            engine.shutdown()
        results[budget] = out
    print("| attention | " + " | ".join(f"L={n} d={d}" for n, d, _ in cells) + " | found | greedy = dense |")
    print("|---|" + "---|" * (len(cells) + 2))
    for budget, out in results.items():
        same = np.mean([o[1] == dense[1] for o, dense in zip(out, results[None])])
        print(f"| {label(budget)} | " + " | ".join(("yes" if ok else "no") + (f" ({ratio:.2f})" if budget else "")
                                                   for ok, _, ratio in out)
              + f" | {sum(o[0] for o in out)}/{len(out)} | {100 * same:.0f}% |", flush=True)


def fidelity(args) -> None:
    from jaxserve.models import ForwardBatch
    from jaxserve.weights import load
    from pallas_kernels.sparse import SparseAttention

    model = load(None, dtype="float32")
    page = model.page_size
    prompt = long_prompt(model.tokenizer, args)
    pages = np.arange(1, -(-(len(prompt) + args.steps) // page) + 1)
    step, prefill = direct(model)

    def run(sparse, forced=None):
        """Logits of each decode step and the tokens fed (greedy, or `forced`)."""
        logits, k, v, bounds = prefill(prompt, pages)
        out, tokens = [], []
        for i in range(args.steps):
            out.append(np.asarray(logits[0], np.float64))
            tokens.append(forced[i] if forced is not None else int(np.argmax(logits[0])))
            batch = ForwardBatch.build([([tokens[-1]], len(prompt) + i, pages)], page, num_tokens=1, max_seqs=1)
            logits, k, v, bounds = step(sparse, batch, k, v, bounds)
        return out, tokens

    dense, dense_tokens = run(None)
    print("| prompt tokens | attention | mean KL (nats) | top-1 agreement |")
    print("|---|---|---|---|")
    for budget in args.budgets:
        sparse, _ = run(SparseAttention(budget, args.min_context), dense_tokens)
        kl, agree = [], []
        for a, b in zip(dense, sparse):
            la, lb = a - np.logaddexp.reduce(a), b - np.logaddexp.reduce(b)
            kl.append(float((np.exp(la) * (la - lb)).sum()))
            agree.append(a.argmax() == b.argmax())
        print(f"| {len(prompt)} | {label(budget)} | {np.mean(kl):.4f} | {np.mean(agree):.3f} |", flush=True)


def coverage(args) -> None:
    """At the decode step after a long prompt, per layer and query head: the share of the
    dense attention that falls on the pages Quest keeps, against the best possible pages
    of the same number (the query head's own top pages by their true attention)."""
    import dataclasses

    import jax

    from jaxserve.models import ForwardBatch
    from jaxserve.weights import load
    from pallas_kernels.sparse import SparseAttention

    model = load(None, dtype="float32")
    cfg, page = model.config, model.page_size
    prompt = long_prompt(model.tokenizer, args)
    pages = np.arange(1, -(-(len(prompt) + 1) // page) + 1)
    seen = []  # per layer: (q, the layer's page table, KV length, Quest's table, its length)

    @dataclasses.dataclass(frozen=True)
    class Probe(SparseAttention):
        """Records what Quest keeps in each layer, and attends densely."""

        def select(self, q, kmin, kmax, page_table, kv_lens, page_size, sm_scale):
            table, lens = super().select(q, kmin, kmax, page_table, kv_lens, page_size, sm_scale)
            jax.debug.callback(lambda *a: seen.append([np.asarray(x) for x in a]), q, page_table, kv_lens, table,
                               lens, ordered=True)
            return page_table, kv_lens

    def shares(keys):
        """(Quest's share, the best share) `[layers, Hq]` from the keys after the step."""
        quest, best = [], []
        for q, table, n, kept_table, kept_len in seen:
            n, width = int(n[0]), -(-int(kept_len[0]) // page)
            k = keys[table[0]].reshape(-1, cfg.num_kv_heads, cfg.head_dim)[:n].astype(np.float64)
            qg = q[0].reshape(cfg.num_kv_heads, -1, cfg.head_dim)
            s = np.einsum("hgd,thd->hgt", qg, k) * cfg.head_dim**-0.5
            w = np.exp(s - s.max(-1, keepdims=True))
            mass = np.zeros((*w.shape[:2], -(-n // page)))
            np.add.at(mass, (..., np.arange(n) // page), w / w.sum(-1, keepdims=True))
            kept = np.isin(table[0][:mass.shape[-1]], kept_table[0][:width])
            quest.append((mass * kept).sum(-1).ravel())
            best.append(-np.sort(-mass, axis=-1)[..., :width].sum(-1).ravel())
        return np.stack(quest), np.stack(best)

    step, prefill = direct(model)
    logits, k, v, bounds = prefill(prompt, pages)
    batch = ForwardBatch.build([([int(np.argmax(logits[0]))], len(prompt), pages)], page, num_tokens=1, max_seqs=1)
    print("| prompt tokens | budget | Quest's share, mean | best share, mean | Quest, worst head | best, that head "
          "| Quest / best, layers 0-2 |")
    print("|---|---|---|---|---|---|---|")
    for budget in args.budgets:
        seen.clear()
        _, after, _, _ = step(Probe(budget, 0), batch, k, v, bounds)
        jax.effects_barrier()
        quest, best = shares(np.asarray(after).reshape(-1, *after.shape[2:]))  # pages of all layers, flat
        worst = np.unravel_index(np.argmin(quest), quest.shape)
        print(f"| {len(prompt)} | {budget} | {quest.mean():.3f} | {best.mean():.3f} | {quest[worst]:.3f} "
              f"(layer {worst[0]}) | {best[worst]:.3f} | {quest[:3].mean():.3f} / {best[:3].mean():.3f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["speed", "passkey", "fidelity", "coverage"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--min-context", type=int, default=0)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--text", help="fidelity, coverage: a file whose first --length tokens are the prompt")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.batch, args.repeats, args.budgets = [256], 2, 2, [64]
        args.lengths, args.depths, args.length, args.steps = [300], [0.5], 300, 4
    {"speed": speed, "passkey": passkey, "fidelity": fidelity, "coverage": coverage}[args.mode](args)
    print(json.dumps({"mode": args.mode}))


if __name__ == "__main__":
    main()
