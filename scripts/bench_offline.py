"""Offline throughput: N random prompts through the engine, side by side with transformers.

    python scripts/bench_offline.py --num-prompts 32 --min-input 32 --max-input 256 --output-len 64

Both run greedy on the same token ids with a fixed output length (EOS ignored), on the
same machine, one after the other. transformers runs `generate` on the whole batch with
left padding (its best case); jaxserve gets the prompts all at once, as a server would.
Prints a markdown table of input and output tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def run_jaxserve(prompts, output_len: int, args) -> float:
    import jaxserve

    engine = jaxserve.Engine(args.model_path, max_running_requests=args.max_running_requests,
                             max_prefill_tokens=args.max_prefill_tokens, chunked_prefill_size=args.chunked_prefill_size,
                             context_length=args.context_length)
    try:
        params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
        engine.generate(input_ids=prompts[:2], sampling_params={**params, "max_new_tokens": 2})  # warm caches
        engine.flush_cache()
        start = time.perf_counter()
        results = engine.generate(input_ids=prompts, sampling_params=params)
        seconds = time.perf_counter() - start
        assert all(r["meta_info"]["completion_tokens"] == output_len for r in results)
        return seconds
    finally:
        engine.shutdown()


def run_transformers(prompts, output_len: int, args) -> float:
    import torch
    import transformers

    from jaxserve.weights.gguf_file import BUNDLED_GGUF, bundled_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    if args.model_path is None:
        path = bundled_model_path()
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    gen = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:2], attention_mask=mask[:2], **{**gen, "max_new_tokens": 2, "min_new_tokens": 2})
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **gen)
        seconds = time.perf_counter() - start
    assert out.shape[1] == width + output_len
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--min-input", type=int, default=32)
    parser.add_argument("--max-input", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    # None: the engine's defaults for the backend
    parser.add_argument("--max-running-requests", type=int, default=None)
    parser.add_argument("--max-prefill-tokens", type=int, default=None)
    parser.add_argument("--chunked-prefill-size", type=int, default=None)
    parser.add_argument("--context-length", type=int, default=None, help="default: the model's (8192 for SmolLM2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    if args.quick:  # a tiny random model and small shapes: it only checks the script works
        args.num_prompts, args.min_input, args.max_input, args.output_len = 4, 8, 24, 4
        args.max_running_requests, args.max_prefill_tokens, args.chunked_prefill_size = 4, 64, 64
        args.context_length = args.context_length or 256
        if args.model_path is None:
            from bench_host_overhead import tiny_model  # scripts/ is on the path when run as a script

            args.model_path = tiny_model(tmp.name)
    prompts = random_prompts(args.num_prompts, args.min_input, args.max_input, 49152, args.seed)
    tokens_in = sum(len(p) for p in prompts)
    tokens_out = args.num_prompts * args.output_len
    rows = [("jaxserve", run_jaxserve(prompts, args.output_len, args))]
    if not args.skip_transformers:
        rows.append(("transformers generate", run_transformers(prompts, args.output_len, args)))
    print(f"\n{args.num_prompts} prompts, {tokens_in} input tokens, {tokens_out} output tokens (greedy, EOS ignored)\n")
    print("| engine | seconds | input tok/s | output tok/s | speed-up |")
    print("|---|---|---|---|---|")
    base = rows[-1][1]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {tokens_in / seconds:.1f} | {tokens_out / seconds:.1f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
