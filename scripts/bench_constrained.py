"""Structured outputs: what a grammar costs, on the bundled SmolLM2, in one process.

    python scripts/bench_constrained.py                 # the full run (docs/BENCHMARKS.md)
    python scripts/bench_constrained.py --quick         # a smoke run for the test suite

(d) Grammar compile time, cold and cached: `engine.grammars.get(spec)` on a spec never seen
    (each repetition changes the schema's `description`, or wraps the regex in one more
    group, so the text, the cache key, is new and the grammar the same) against the same
    spec again; and `Grammar.start()`, the per-request copy. Medians.
(a) Throughput of N concurrent JSON-schema requests against the same N requests without a
    grammar (same chat prompts, greedy, radix cache flushed before every run). A grammar
    ends a request where the JSON closes, while an unconstrained greedy model stops at its
    own EOS (or never): the raw token counts would differ and so would the batch. So the
    unconstrained run uses `ignore_eos` and gives each request `max_new_tokens` equal to
    the output length of its constrained twin: both runs decode exactly the same number
    of tokens per request, with the same batch shrinking as requests finish, and the only
    difference left is the grammar (masks, matcher advances, jump-forward). Reported as
    output tokens/s and their ratio (target >= 0.9x), on one engine with jump-forward on
    (the default) and one with it off (the mask cost alone: without forced tokens each
    output token is one sampled step, as in the unconstrained run).
(b) Host time per mask per request: the constrained outputs of (a) are replayed through
    fresh matchers from `engine.grammars.get(spec).start()`, stepping B of them together
    exactly as the scheduler does (one `fill_masks` over the rows, then accept the token
    and take the forced ones), for B = 1, 8, 32. Microseconds per `fill_masks` call (steps
    where all B rows are live, median) and per row mask (total / rows). The step wall time
    of the constrained run of (a) (seconds / `num_steps`) and the scheduler's own
    `host_ms_per_step_median` (get_server_info) put the 32-row mask in proportion.
(c) Jump-forward on and off, on a schema whose keys are long fixed strings that the
    grammar forces: decode steps (`num_steps` difference in get_server_info), wall time,
    output and forced tokens, two engines one after the other.

Each engine first runs the constrained workloads of (a) and (c) once, untimed, so that the
tables measure the steady state; the script prints how many jit compilations that warm-up
caused (0: constrained steps run the programs compiled at start-up), and the tables'
`jit compiles` column should read 0 too. Outputs of every constrained run are checked with
`json.loads` + `jsonschema.validate`. On CPU the forward and the host share the cores (and
other processes may share them too): run it on an idle machine. `--quick` swaps in a tiny random 2-layer Llama (with SmolLM2's
tokenizer), small batches and one engine whose jump-forward flag is flipped between the
runs (`--same-engine`): loading and warming up SmolLM2 alone takes over a minute on two
cores. The tables and their headings are the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

# One schema for the throughput runs: bounded strings and numbers, so every output closes.
ITEM_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 32},
        "category": {"type": "string", "enum": ["food", "tool", "toy", "book", "clothing", "other"]},
        "price_in_cents": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "in_stock": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "category", "price_in_cents", "in_stock", "tags"],
    "additionalProperties": False,
}
# Long fixed keys: most of the output is forced by the grammar (jump-forward's best case).
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer_full_name_as_on_record": {"type": "string", "maxLength": 32},
        "shipping_address_line_one": {"type": "string", "maxLength": 40},
        "shipping_address_postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
        "preferred_delivery_time_window": {"type": "string", "enum": ["morning", "afternoon", "evening"]},
        "gift_wrapping_requested_by_customer": {"type": "boolean"},
        "number_of_items_in_this_order": {"type": "integer", "minimum": 1, "maximum": 99},
    },
    "required": ["customer_full_name_as_on_record", "shipping_address_line_one", "shipping_address_postal_code",
                 "preferred_delivery_time_window", "gift_wrapping_requested_by_customer",
                 "number_of_items_in_this_order"],
    "additionalProperties": False,
}
INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "invoice_id": {"type": "string", "pattern": "INV-[0-9]{6}"},
        "issued": {"type": "string", "format": "date"},
        "lines": {"type": "array", "maxItems": 20, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "maxLength": 12}, "qty": {"type": "integer", "minimum": 1},
                           "unit_price": {"type": "number"}, "discount": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
            "required": ["sku", "qty", "unit_price"], "additionalProperties": False}},
        "billing": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                      "country": {"type": "string", "enum": ["US", "DE", "FR", "JP"]}},
                    "required": ["city", "country"]},
        "notes": {"type": "string", "maxLength": 200},
    },
    "required": ["invoice_id", "issued", "lines", "billing"],
}
WIDE_SCHEMA = {
    "type": "object",
    "properties": {f"field_{i:02d}": ({"type": "integer"}, {"type": "string", "maxLength": 20}, {"type": "boolean"},
                                      {"type": "number"})[i % 4] for i in range(40)},
    "required": [f"field_{i:02d}" for i in range(0, 40, 2)],
    "additionalProperties": False,
}
PHONE_REGEX = r"\+?[0-9]{1,3}[ -]?\(?[0-9]{3}\)?[ -]?[0-9]{3}[ -]?[0-9]{4}"
COMPILE_CASES = [("json_schema: item (a)", "json_schema", ITEM_SCHEMA),
                 ("json_schema: order, long keys (c)", "json_schema", ORDER_SCHEMA),
                 ("json_schema: invoice, nested", "json_schema", INVOICE_SCHEMA),
                 ("json_schema: 40 properties", "json_schema", WIDE_SCHEMA),
                 ("json_schema: {\"type\": \"object\"}", "json_schema", {"type": "object"}),
                 ("regex: phone number", "regex", PHONE_REGEX)]

ITEMS = ["a hammer", "a loaf of bread", "a children's puzzle", "a paperback novel", "a winter coat", "a garden hose",
         "a box of tea", "a screwdriver set", "a board game", "a cookbook", "running shoes", "a chess set",
         "olive oil", "a cordless drill", "a teddy bear", "a dictionary", "a rain jacket", "a wrench",
         "dark chocolate", "a kite", "a travel guide", "wool socks", "a measuring tape", "honey",
         "a yo-yo", "a poetry collection", "a baseball cap", "a flashlight", "coffee beans", "toy blocks",
         "an atlas", "a scarf"]
CUSTOMERS = ["Maria Gonzalez", "John Smith", "Aiko Tanaka", "Pierre Dubois", "Fatima Khan", "Lars Nilsson",
             "Chen Wei", "Olivia Brown"]


def item_prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Describe {ITEMS[i % len(ITEMS)]} as a store catalogue item in JSON."}],
        add_generation_prompt=True, tokenize=True) for i in range(n)]


def order_prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Write the order of {CUSTOMERS[i % len(CUSTOMERS)]}, who bought "
                                     f"{ITEMS[i % len(ITEMS)]}, as JSON."}],
        add_generation_prompt=True, tokenize=True) for i in range(n)]


def spec_for(field: str, value):
    from jaxserve.constrained import spec_of
    from jaxserve.sampling.params import SamplingParams

    return spec_of(SamplingParams(**{field: value}))


def median_us(values: list[float]) -> float:
    return statistics.median(values) * 1e6


# ---- (d) compile ----

def bench_compile(engine, reps: int) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    engine.grammars.tokenizer  # noqa: B018 - built on first use; not part of any grammar's compile
    tokenizer_s = time.perf_counter() - start
    rows = []
    for name, field, value in COMPILE_CASES:
        cold = []
        for k in range(reps):
            tag = f"{uuid.uuid4().hex} {k}"
            fresh = ({**value, "description": tag} if field == "json_schema" else "(?:" * (k + 1) + value + ")" * (k + 1))
            spec = spec_for(field, fresh)
            t = time.perf_counter()
            engine.grammars.get(spec)
            cold.append(time.perf_counter() - t)
        spec = spec_for(field, value)
        engine.grammars.get(spec)
        cached, starts = [], []
        for _ in range(200):
            t = time.perf_counter()
            template = engine.grammars.get(spec)
            cached.append(time.perf_counter() - t)
            t = time.perf_counter()
            template.start()
            starts.append(time.perf_counter() - t)
        rows.append({"name": name, "cold_ms": statistics.median(cold) * 1e3, "cold_max_ms": max(cold) * 1e3,
                     "cached_us": median_us(cached), "start_us": median_us(starts)})
    return tokenizer_s, rows


# ---- (a), (c): runs ----

def valid_json(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def timed_run(engine, prompts, params: list[dict], schema: dict | None = None) -> dict:
    """All `prompts` at once (one `async_generate` call), radix cache flushed first."""
    sched = engine.scheduler
    assert engine.flush_cache()
    sched.call(sched.times.reset)
    before = engine.get_server_info()
    start = time.perf_counter()
    outs = asyncio.run(engine.async_generate(input_ids=prompts, sampling_params=params))
    seconds = time.perf_counter() - start
    info = engine.get_server_info()
    metas = [o["meta_info"] for o in outs]
    return {"seconds": seconds, "steps": info["num_steps"] - before["num_steps"], "outs": outs,
            "lengths": [m["completion_tokens"] for m in metas], "tokens": sum(m["completion_tokens"] for m in metas),
            "forced": sum(m.get("forced_tokens", 0) for m in metas),
            "stopped": sum(m["finish_reason"]["type"] == "stop" for m in metas),
            "valid": sum(valid_json(o["text"], schema) for o in outs) if schema is not None else None,
            "host_ms": info["host_ms_per_step_median"],
            "compiles": info["compilations_after_warmup"] - before["compilations_after_warmup"]}


def bench_throughput(engine, prompts, max_new: int, repeats: int) -> tuple[dict, dict]:
    """Best of `repeats` (by wall time) of the constrained run and of its length-matched twin."""
    greedy = {"temperature": 0, "max_new_tokens": max_new}
    best_c = best_u = None
    for _ in range(repeats):
        con = timed_run(engine, prompts, [{**greedy, "json_schema": ITEM_SCHEMA}] * len(prompts), ITEM_SCHEMA)
        matched = [{"temperature": 0, "ignore_eos": True, "max_new_tokens": n} for n in con["lengths"]]
        unc = timed_run(engine, prompts, matched)
        assert unc["lengths"] == con["lengths"], (unc["lengths"], con["lengths"])
        best_c = con if best_c is None or con["seconds"] < best_c["seconds"] else best_c
        best_u = unc if best_u is None or unc["seconds"] < best_u["seconds"] else best_u
    return best_c, best_u


# ---- (b) masks ----

def bench_masks(engine, outputs: list[list[int]], batch_sizes: list[int], rounds: int) -> list[dict]:
    """Replay constrained outputs (made with jump-forward on) through fresh matchers, B at a
    time, as the scheduler steps them: a mask for every live row, then accept the sampled
    token and skip past the tokens the grammar forces."""
    from jaxserve.constrained import fill_masks

    template = engine.grammars.get(spec_for("json_schema", ITEM_SCHEMA))
    vocab = engine.model.config.vocab_size
    rows = []
    for size in batch_sizes:
        full_calls, total_s, total_rows = [], 0.0, 0
        for r in range(rounds):
            seqs = [outputs[(r * size + i) % len(outputs)] for i in range(size)]
            grammars = [template.start() for _ in seqs]
            pos = [0] * size
            while True:
                live = [(i, grammars[i]) for i in range(size) if pos[i] < len(seqs[i]) and not grammars[i].done]
                if not live:
                    break
                t = time.perf_counter()
                fill_masks(live, size, vocab)
                dt = time.perf_counter() - t
                total_s, total_rows = total_s + dt, total_rows + len(live)
                if len(live) == size:
                    full_calls.append(dt)
                for i, g in live:
                    token = seqs[i][pos[i]]
                    if not g.accept(token):
                        raise RuntimeError(f"replay: the grammar rejects token {token}: {g.error}")
                    forced = g.forced(len(seqs[i]) - pos[i] - 1)
                    if forced != seqs[i][pos[i] + 1: pos[i] + 1 + len(forced)]:
                        raise RuntimeError("replay: forced tokens differ from the engine's output")
                    pos[i] += 1 + len(forced)
        rows.append({"rows": size, "calls": len(full_calls), "call_us": median_us(full_calls) if full_calls else 0.0,
                     "row_us": total_s / total_rows * 1e6})
    return rows


# ---- main ----

def make_engine(args, model_path, disable_jump_forward: bool, cache_dir: str):
    import jaxserve

    kwargs = dict(context_length=args.context_length, disable_jump_forward=disable_jump_forward,
                  compilation_cache_dir=cache_dir)
    for name in ("max_running_requests", "max_prefill_tokens", "chunked_prefill_size"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return jaxserve.Engine(model_path, **kwargs)


def tokens_per_s(run: dict) -> float:
    return run["tokens"] / run["seconds"]


def measure(engine, args, items, orders, order_params) -> dict:
    """Warm up (the constrained workloads once, untimed), then (a) and (c)'s run."""
    before = engine.get_server_info()["compilations_after_warmup"]
    greedy = {"temperature": 0, "max_new_tokens": args.max_new_tokens}
    timed_run(engine, items, [{**greedy, "json_schema": ITEM_SCHEMA}] * len(items))
    timed_run(engine, orders, order_params * len(orders))
    compiles = engine.get_server_info()["compilations_after_warmup"] - before
    con, unc = bench_throughput(engine, items, args.max_new_tokens, args.repeats)
    order = timed_run(engine, orders, order_params * len(orders), ORDER_SCHEMA)
    return {"warmup_compiles": compiles, "con": con, "unc": unc, "order": order}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="default: the bundled SmolLM2 (--quick: a tiny random model)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per kind; the fastest counts")
    parser.add_argument("--mask-batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--mask-rounds", type=int, default=4)
    parser.add_argument("--compile-reps", type=int, default=7)
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--max-running-requests", type=int, default=None)  # None: the engine's backend defaults
    parser.add_argument("--max-prefill-tokens", type=int, default=None)
    parser.add_argument("--chunked-prefill-size", type=int, default=None)
    parser.add_argument("--same-engine", action="store_true",
                        help="jump-forward off by flipping the running engine's flag instead of a second engine")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes, one engine, for the test suite")
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    model_path = args.model_path
    if args.quick:
        args.num_requests, args.max_new_tokens, args.repeats = 4, 120, 1
        args.mask_batch_sizes, args.mask_rounds, args.compile_reps = [1, 4], 1, 3
        args.context_length, args.max_running_requests = 512, 4
        args.max_prefill_tokens = args.chunked_prefill_size = 64
        args.same_engine = True
        if model_path is None:
            from bench_host_overhead import tiny_model  # scripts/ is on the path when run as a script

            model_path = tiny_model(tmp.name)
    cache_dir = str(Path(tmp.name) / "jax-cache")  # a second engine compiles nothing
    order_params = [{"temperature": 0, "max_new_tokens": args.max_new_tokens + 40, "json_schema": ORDER_SCHEMA}]

    started = time.perf_counter()
    engine = make_engine(args, model_path, False, cache_dir)
    load_s = time.perf_counter() - started
    try:
        tokenizer_s, compile_rows = bench_compile(engine, args.compile_reps)
        items = item_prompts(engine.tokenizer, args.num_requests)
        orders = order_prompts(engine.tokenizer, args.num_requests)
        on = measure(engine, args, items, orders, order_params)
        mask_rows = bench_masks(engine, [o["output_ids"] for o in on["con"]["outs"]], args.mask_batch_sizes,
                                args.mask_rounds)
        if args.same_engine:
            engine.args.disable_jump_forward = True  # read per request when its matchers start
            off = measure(engine, args, items, orders, order_params)
    finally:
        engine.shutdown()
    if not args.same_engine:
        engine = make_engine(args, model_path, True, cache_dir)
        try:
            off = measure(engine, args, items, orders, order_params)
        finally:
            engine.shutdown()
    tmp.cleanup()
    n = args.num_requests
    con_on, unc_on, jf_on = on["con"], on["unc"], on["order"]
    con_off, unc_off, jf_off = off["con"], off["unc"], off["order"]
    sample = con_on["outs"][0]["text"], jf_on["outs"][0]["text"]

    print(f"\nmodel: {model_path or 'bundled SmolLM2-135M-Instruct'}; first engine built in {load_s:.1f} s; "
          f"{n} requests, greedy, max_new_tokens {args.max_new_tokens}")
    print(f"sample outputs: {sample[0]!r}\n                {sample[1]!r}")
    print(f"jit compilations during the untimed warm-up runs (first constrained requests): "
          f"{on['warmup_compiles']} (jump-forward on engine), {off['warmup_compiles']} (off)")

    print("\n### (a) Throughput: JSON schema vs the same requests unconstrained (length-matched)\n")
    print("| engine | run | seconds | output tokens | forced tokens | output tok/s | steps | host ms/step (median) "
          "| finished by grammar | schema-valid | jit compiles |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for engine_name, con, unc in (("jump-forward on", con_on, unc_on), ("jump-forward off", con_off, unc_off)):
        for name, run in (("json_schema", con), ("unconstrained", unc)):
            done = f"{run['stopped']}/{n}" if name == "json_schema" else "-"
            valid = f"{run['valid']}/{n}" if run["valid"] is not None else "-"
            print(f"| {engine_name} | {name} | {run['seconds']:.2f} | {run['tokens']} | {run['forced']} "
                  f"| {tokens_per_s(run):.1f} | {run['steps']} | {run['host_ms']:.2f} | {done} | {valid} "
                  f"| {run['compiles']} |")
    print(f"\nconstrained/unconstrained throughput ratio: {tokens_per_s(con_on) / tokens_per_s(unc_on):.2f}x "
          f"(jump-forward on), {tokens_per_s(con_off) / tokens_per_s(unc_off):.2f}x (jump-forward off); target >= 0.9x")

    print("\n### (b) Host time per mask (llguidance fill_masks, replaying (a)'s outputs)\n")
    print("| rows per call | calls (all rows live) | us per call (median) | us per row mask (mean) |")
    print("|---|---|---|---|")
    for r in mask_rows:
        print(f"| {r['rows']} | {r['calls']} | {r['call_us']:.0f} | {r['row_us']:.1f} |")
    widest = mask_rows[-1]
    step_ms = con_on["seconds"] / con_on["steps"] * 1e3
    print(f"\nmask share of the step: a {widest['rows']}-row mask takes {widest['call_us'] / 1e3:.2f} ms; the "
          f"constrained run's wall time per step is {step_ms:.1f} ms ({widest['call_us'] / 1e3 / step_ms:.1%}), "
          f"its host ms/step median {con_on['host_ms']:.2f} vs {unc_on['host_ms']:.2f} unconstrained "
          f"(jump-forward off: {con_off['host_ms']:.2f} vs {unc_off['host_ms']:.2f})")

    print("\n### (c) Jump-forward on vs off (long fixed keys)\n")
    print("| jump-forward | seconds | steps | output tokens | forced tokens | output tok/s | finished by grammar "
          "| schema-valid |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run in (("on", jf_on), ("off", jf_off)):
        print(f"| {name} | {run['seconds']:.2f} | {run['steps']} | {run['tokens']} | {run['forced']} "
              f"| {tokens_per_s(run):.1f} | {run['stopped']}/{n} | {run['valid']}/{n} |")
    print(f"\njump-forward steps ratio off/on: {jf_off['steps'] / jf_on['steps']:.2f}x; "
          f"wall time ratio off/on: {jf_off['seconds'] / jf_on['seconds']:.2f}x")

    print("\n### (d) Grammar compile time, cold vs cached\n")
    print(f"llguidance tokenizer (once per engine, on first use): {tokenizer_s * 1e3:.0f} ms\n")
    print("| grammar | cold compile ms (median) | cold max ms | cached get us (median) | start() us (median) |")
    print("|---|---|---|---|---|")
    for r in compile_rows:
        print(f"| {r['name']} | {r['cold_ms']:.1f} | {r['cold_max_ms']:.1f} | {r['cached_us']:.1f} "
              f"| {r['start_us']:.1f} |")


if __name__ == "__main__":
    main()
