"""Host time per decode step, measured inside the scheduler, with the overlap loop on and off.

    python scripts/bench_host_overhead.py --running 32 128 256 --history 1000 --output-len 64

N requests with `--history`-token prompts decode together on a tiny random Llama (2
layers, so the device step is short and the host's share shows). The scheduler times its
own host work per iteration, as wall time (planning, batch building, launching, output
handling and delivery; not time blocked on the device), and a watcher thread timestamps when each
step's results are ready, which gives the device-idle gap between one step finishing and
the next one's forward being launched. Only iterations that launched a decode step of
all N requests count.

`--engine-src DIR` runs the same workload on another checkout (e.g. a `git worktree` of an
older commit) whose scheduler has no instrumentation: there the host time of a step is
its planning (`_schedule`) plus `_run` minus the runner's `step` call inside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def tiny_model(folder: str) -> str:
    """A random 2-layer Llama written into `folder`/tiny: what `--quick` runs use."""
    path = Path(folder) / "tiny"
    write_tiny_model(path, 49152)
    return str(path)


def write_tiny_model(path: Path, vocab: int, seed: int = 0) -> None:
    """A random 2-layer Llama as config.json + model.safetensors, and the bundled tokenizer."""
    hidden, inter, layers, heads, kv_heads = 64, 128, 2, 4, 2
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
               "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                    p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                    p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                    p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                    p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                    p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                    p + "mlp.down_proj.weight": (hidden, inter)}
    header, blobs, offset = {}, [], 0
    for name, shape in tensors.items():
        data = (1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("norm.weight")
                else 0.1 * rng.standard_normal(shape)).astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(config))
    from jaxserve.tokenizer import load_tokenizer
    from jaxserve.weights.gguf_file import bundled_model_path

    load_tokenizer(bundled_model_path()).save(path)


class OldInstrumentation:
    """Host time per step of the pre-v2 scheduler: `_schedule` + (`_run` - `runner.step`)."""

    def __init__(self, scheduler):
        self.steps: list[float] = []
        self.active = False
        sched_fn, run_fn, step_fn = scheduler._schedule, scheduler._run, scheduler.runner.step
        device = [0.0]

        def schedule():
            start = time.perf_counter()
            rows = sched_fn()
            self.pending = time.perf_counter() - start
            return rows

        def step(inp):
            start = time.perf_counter()
            out = step_fn(inp)
            device[0] = time.perf_counter() - start
            return out

        def run(rows):
            start = time.perf_counter()
            run_fn(rows)
            if self.active:
                self.steps.append(self.pending + time.perf_counter() - start - device[0])

        scheduler._schedule, scheduler._run, scheduler.runner.step = schedule, run, step


async def generate_all(engine, prompts, output_len: int) -> float:
    params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
    start = time.perf_counter()
    await engine.async_generate(input_ids=prompts, sampling_params=params)
    return time.perf_counter() - start


def measure(model_dir: Path, running: int, args, overlap: bool | None) -> dict:
    import jaxserve

    rng = np.random.default_rng(running)
    prompts = [rng.integers(3, args.vocab, size=args.history).tolist() for _ in range(running)]
    kwargs = dict(max_running_requests=running, max_prefill_tokens=args.max_prefill_tokens,
                  chunked_prefill_size=args.max_prefill_tokens, context_length=args.history + args.output_len + 64,
                  max_total_tokens=running * (args.history + args.output_len + 32), dtype="float32")
    if overlap is not None:
        kwargs["disable_overlap_schedule"] = not overlap
    engine = jaxserve.Engine(str(model_dir), **kwargs)
    try:
        sched = engine.scheduler
        if overlap is None:
            probe = OldInstrumentation(sched)
            probe.active = True
        else:
            sched.call(lambda: (sched.times.reset(), sched.times.watch_device(True)))
        seconds = asyncio.run(generate_all(engine, prompts, args.output_len))
        if overlap is None:
            host, gaps = probe.steps[-(args.output_len - 2):], []  # the decode steps are the last ones
            dispatch = [float("nan")]
        else:
            def read():
                times = sched.times
                times.watch_device(False)
                keep = [i for i, n in enumerate(times.decode_rows) if n == running]
                return [times.host_s[i] for i in keep], [times.dispatch_s[i] for i in keep], list(times.gap_s)

            host, dispatch, gaps = sched.call(read)
        return {"running": running, "overlap": "old" if overlap is None else overlap, "steps": len(host),
                "seconds": round(seconds, 2), "host_ms_median": round(statistics.median(host) * 1e3, 3),
                "host_ms_mean": round(statistics.fmean(host) * 1e3, 3),
                "dispatch_ms_median": round(statistics.median(dispatch) * 1e3, 3),
                "device_idle_gap_ms": round(statistics.median(gaps) * 1e3, 3) if gaps else None}
    finally:
        engine.shutdown()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--running", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--history", type=int, default=1000)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-prefill-tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--engine-src", default=None, help="import jaxserve from this checkout instead")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    if args.quick:
        args.running, args.history, args.output_len, args.max_prefill_tokens = [4], 40, 8, 256
    if args.engine_src:
        sys.path.insert(0, args.engine_src)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_model(Path(tmp), args.vocab)
        modes = [None] if args.engine_src else [True, False]  # None: the old engine
        rows = [measure(Path(tmp), n, args, overlap) for n in args.running for overlap in modes]
    print("| running | overlap | decode steps | host ms/step (median) | host ms/step (mean) "
          "| of which jit dispatch (median) | device-idle gap ms (median) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['running']} | {r['overlap']} | {r['steps']} | {r['host_ms_median']} | {r['host_ms_mean']} "
              f"| {r['dispatch_ms_median']} | {r['device_idle_gap_ms']} |")


if __name__ == "__main__":
    main()
