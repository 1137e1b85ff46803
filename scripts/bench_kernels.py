"""Validate and time the paged-attention kernels on the current device.

1. Validation: every kernel of the device (triton on GPU, tpu on TPU; both in
   interpret mode with --quick) against the jnp reference on random mixed batches
   (prefill + extend + decode, padding, permuted pages), f32 and bf16.
2. Device roofline: copy bandwidth (a large device-to-device copy, read + write bytes)
   and bf16 matmul TFLOP/s.
3. Decode (paged_decode) at batch {1, 8, 32, 128} x context {512, 2048, 8192},
   Llama-3-8B heads (32 q, 8 kv, head_dim 128), bf16, page size 16: time per call and
   achieved bandwidth = bytes of KV and q read / time, for the kernel and the XLA
   (jnp reference) path.
4. Prefill (ragged_paged_attention, causal): TFLOP/s = 4 * Hq * D * sum(causal
   query-key pairs) / time.

Each timing runs the op `--iters` times inside one jitted fori_loop (the output feeds
the next query, so nothing is hoisted) and reports the median of a few such runs.

    python scripts/bench_kernels.py              # on a GPU or TPU; markdown to stdout
    python scripts/bench_kernels.py --quick      # CPU smoke run: tiny shapes, interpret mode
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels.dispatch import KERNELS
from pallas_kernels.testing import Case, decode_inputs, mixed_batch, ragged_inputs

FULL = dict(heads=(32, 8, 128), page_size=16, batches=(1, 8, 32, 128), contexts=(512, 2048, 8192),
            prefill=((1, 2048), (4, 2048), (1, 8192)), iters=20, repeats=5)
QUICK = dict(heads=(4, 2, 64), page_size=16, batches=(1, 2), contexts=(32, 64),
             prefill=((1, 32), (2, 32)), iters=1, repeats=1)
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def device_kernels(quick: bool) -> list[str]:
    if quick:
        return sorted(KERNELS)
    backend = jax.default_backend()
    return ["tpu"] if backend == "tpu" else ["triton"] if backend in ("gpu", "cuda", "rocm") else []


def median_seconds(step, x, operands=(), *, iters: int, repeats: int) -> float:
    """Median wall time of one `step(x, *operands) -> x` call, run iters times per jitted loop.

    The operands (KV pools, tables) are jit arguments, not closed-over constants.
    """
    loop = jax.jit(lambda x, ops: jax.lax.fori_loop(0, iters, lambda _, y: step(y, *ops), x))
    jax.block_until_ready(loop(x, operands))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(loop(x, operands))
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


# --------------------------------------------------------------------------- validation

def validation_cases(quick: bool) -> list[Case]:
    cases = [
        Case(4, 4, 64, 8, "float32", *mixed_batch(8, 45), max_seqs=8, pad_tokens=3),
        Case(6, 2, 128, 16, "bfloat16", *mixed_batch(16, 70), max_seqs=7, pad_tokens=1, seed=1),
        Case(8, 1, 64, 64, "float32", *mixed_batch(64, 150), max_seqs=6, sliding_window=19, seed=2),
    ]
    if quick:
        return cases[1:2]  # interpret mode is slow; the tests cover the rest
    hq, hkv, d = FULL["heads"]
    cases.append(Case(hq, hkv, d, 16, "bfloat16", *mixed_batch(16, 3000), max_seqs=8, seed=3))
    return cases


def validate(quick: bool) -> list[tuple]:
    """Rows (kernel, op, case, max |err|, tolerance, ok) of kernel vs reference."""
    rows = []
    for impl in device_kernels(quick):
        kernel = KERNELS[impl]
        for case in validation_cases(quick):
            kw = dict(sm_scale=case.sm_scale, soft_cap=case.soft_cap, sliding_window=case.sliding_window)
            small = dict(block_kv=16) if quick else {}
            args = ragged_inputs(case)
            expect = pallas_kernels.ragged_paged_attention_reference(*args, **kw)
            got = jax.jit(functools.partial(kernel["ragged"], **kw, **small, interpret=quick))(*args)
            rows.append((impl, "ragged", case.id(), *_compare(got, expect, case.dtype)))

            dcase = Case(case.num_q_heads, case.num_kv_heads, case.head_dim, case.page_size, case.dtype,
                         (1,) * len(case.kv_lens), tuple(max(1, n) for n in case.kv_lens),
                         case.max_seqs, sliding_window=case.sliding_window, seed=case.seed)
            dargs = decode_inputs(dcase)
            expect = pallas_kernels.paged_decode_reference(*dargs, **kw)
            got = jax.jit(functools.partial(kernel["decode"], **kw, **small, num_splits=3,
                                            interpret=quick))(*dargs)
            rows.append((impl, "decode", dcase.id(), *_compare(got, expect, dcase.dtype)))
    return rows


def _compare(got, expect, dtype):
    err = float(np.max(np.abs(np.asarray(got, np.float32) - np.asarray(expect, np.float32))))
    tol = TOLERANCE[dtype]
    ok = bool(np.allclose(np.asarray(got, np.float32), np.asarray(expect, np.float32), rtol=tol, atol=tol))
    return err, tol, ok


# ---------------------------------------------------------------------------- roofline

def copy_bandwidth(quick: bool) -> float:
    """GB/s of a device-to-device copy, counting bytes read + written."""
    n = (1 << 20) if quick else (1 << 30)  # bf16 elements: 2 MiB / 2 GiB
    x = jnp.ones((n,), jnp.bfloat16)
    seconds = median_seconds(lambda y: y + 1, x, iters=1 if quick else 10, repeats=3)
    return 2 * n * 2 / seconds / 1e9


def matmul_tflops(quick: bool) -> float:
    n = 256 if quick else 8192
    a = jnp.ones((n, n), jnp.bfloat16) / n
    seconds = median_seconds(lambda y, b: (y @ b).astype(jnp.bfloat16), a, (a,), iters=1 if quick else 10,
                             repeats=3)
    return 2 * n ** 3 / seconds / 1e12


# ------------------------------------------------------------------------------ timing

def paged_problem(rng, batch, context, q_tokens, heads, page_size, dtype):
    """Random pool of just enough pages, shuffled so each sequence's pages are scattered."""
    hq, hkv, d = heads
    pages_per_seq = -(-context // page_size)
    num_pages = 1 + batch * pages_per_seq
    pool = (num_pages, page_size, hkv, d)
    k = jnp.asarray(rng.standard_normal(pool, np.float32), dtype)
    v = jnp.asarray(rng.standard_normal(pool, np.float32), dtype)
    table = (1 + rng.permutation(batch * pages_per_seq)).reshape(batch, pages_per_seq).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((q_tokens, hq, d), np.float32), dtype)
    return q, k, v, jnp.asarray(table)


def bench_decode(impl, cfg, quick, rng):
    rows = []
    hq, hkv, d = cfg["heads"]
    dtype = jnp.bfloat16
    for context in cfg["contexts"]:
        for batch in cfg["batches"]:
            q, k, v, table = paged_problem(rng, batch, context, batch, cfg["heads"], cfg["page_size"], dtype)
            kv_lens = jnp.full((batch,), context, jnp.int32)
            step = functools.partial(pallas_kernels.paged_decode, sm_scale=d ** -0.5, impl=impl,
                                     interpret=quick)
            seconds = median_seconds(step, q, (k, v, kv_lens, table), iters=cfg["iters"],
                                     repeats=cfg["repeats"])
            read = batch * context * hkv * d * 2 * 2 + q.size * 2  # K and V, q (bf16)
            rows.append((impl, batch, context, seconds * 1e6, read / seconds / 1e9))
    return rows


def bench_prefill(impl, cfg, quick, rng):
    rows = []
    hq, hkv, d = cfg["heads"]
    for num_seqs, length in cfg["prefill"]:
        if impl == "reference" and not quick and num_seqs * length > 2048:
            continue  # the reference gathers [tokens, block, Hkv, D]: too big to be worth timing
        q, k, v, table = paged_problem(rng, num_seqs, length, num_seqs * length, cfg["heads"],
                                       cfg["page_size"], jnp.bfloat16)
        kv_lens = jnp.full((num_seqs,), length, jnp.int32)
        cu = jnp.arange(num_seqs + 1, dtype=jnp.int32) * length
        step = functools.partial(pallas_kernels.ragged_paged_attention, sm_scale=d ** -0.5, impl=impl,
                                 interpret=quick)
        operands = (k, v, kv_lens, table, cu, jnp.array([num_seqs], jnp.int32))
        seconds = median_seconds(step, q, operands, iters=cfg["iters"], repeats=cfg["repeats"])
        flops = 4 * hq * d * num_seqs * length * (length + 1) / 2  # QK^T and PV, causal pairs
        rows.append((impl, num_seqs, length, seconds * 1e3, flops / seconds / 1e12))
    return rows


# ------------------------------------------------------------------------------ report

def table(header, rows, fmt):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f.format(x) for f, x in zip(fmt, row)) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, interpret mode")
    parser.add_argument("--no-reference", action="store_true", help="skip timing the XLA reference")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    print(f"`scripts/bench_kernels.py` on {device.platform}: {device.device_kind}, jax {jax.__version__}"
          f"{' (--quick: interpret mode, smoke run only)' if args.quick else ''}\n")

    rows = validate(args.quick)
    print("### Validation against the jnp reference\n")
    print(table(["kernel", "op", "case", "max abs err", "tol", "ok"], rows,
                ["{}", "{}", "{}", "{:.2e}", "{:g}", "{}"]) + "\n")
    failed = [r for r in rows if not r[-1]]

    kernels = device_kernels(args.quick)
    # In quick mode "pallas" runs the Triton kernel in interpret mode.
    impls = (["pallas"] if kernels else []) + ([] if args.no_reference else ["reference"])
    bandwidth, tflops = copy_bandwidth(args.quick), matmul_tflops(args.quick)
    print(f"Device copy bandwidth (read + write): {bandwidth:.1f} GB/s; bf16 matmul: {tflops:.1f} TFLOP/s\n")

    hq, hkv, d = cfg["heads"]
    print(f"### Decode: {hq} q / {hkv} kv heads, head_dim {d}, bf16, page {cfg['page_size']}\n")
    rows = [r for impl in impls for r in bench_decode(impl, cfg, args.quick, rng)]
    rows = [(*r, 100 * r[-1] / bandwidth) for r in rows]
    print(table(["impl", "batch", "context", "us / call", "GB/s", "% of copy bw"], rows,
                ["{}", "{}", "{}", "{:.1f}", "{:.1f}", "{:.0f}%"]) + "\n")

    print("### Prefill (causal, ragged_paged_attention)\n")
    rows = [r for impl in impls for r in bench_prefill(impl, cfg, args.quick, rng)]
    rows = [(*r, 100 * r[-1] / tflops) for r in rows]
    print(table(["impl", "seqs", "length", "ms / call", "TFLOP/s", "% of matmul"], rows,
                ["{}", "{}", "{}", "{:.2f}", "{:.2f}", "{:.0f}%"]))
    if failed:
        print(f"\nVALIDATION FAILED: {len(failed)} case(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
