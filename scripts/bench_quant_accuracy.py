"""How far each weight format is from the float32 model, on the bundled SmolLM2.

    python scripts/bench_quant_accuracy.py --formats float32:int8 float32:fp8 float32:gguf bfloat16:none

On fixed prompts (chats and plain text, ~600 positions), every position's next-token
distribution is compared with float32's (the Q4_1 GGUF dequantized): mean KL(f32 || fmt)
in nats and top-1 agreement. Then each chat of the engine tests is decoded greedily
(24 tokens) and compared token by token with float32: the share of tokens before the
first difference, and whether the reply still contains the expected answer.

`--batch-invariance N` also runs each format in an engine: N prompts of random tokens
decode 24 greedy tokens each alone (cache flushed between them), then all together, and
the table counts the prompts whose tokens are the same both ways.
"""

from __future__ import annotations

import argparse

import numpy as np

CHATS = {"What is the capital of France?": "Paris", "What is 2 + 2? Answer with a number.": "4",
         "What is the opposite of hot?": "cold", "What colour is the sky on a clear day?": "blue"}
TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type with an oil-based ink and a screw press adapted from wine making.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n",
    "Photosynthesis converts light energy into chemical energy. In the light-dependent reactions, water is "
    "split and oxygen is released, while ATP and NADPH carry energy to the Calvin cycle.",
    "Dear hiring committee, I am writing to apply for the position of research assistant in your laboratory. "
    "Over the last two years I have",
]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def prompts(tokenizer) -> list[list[int]]:
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True) for q in CHATS]
    return chats + [tokenizer.encode(t) for t in TEXTS]


def compare(ref, model, ref_logp: list[np.ndarray], ref_greedy: list[list[int]], new_tokens: int) -> dict:
    kl, agree, count = 0.0, 0, 0
    for ids, lp in zip(prompts(ref.tokenizer), ref_logp):
        lq = log_softmax(model.logits(ids))
        kl += float((np.exp(lp) * (lp - lq)).sum())
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        count += len(ids)
    same, answered = [], 0
    for (question, answer), ids, want in zip(CHATS.items(), prompts(ref.tokenizer), ref_greedy):
        got = model.generate_greedy(ids, new_tokens)
        prefix = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        same.append(prefix / len(want))
        answered += answer.lower() in ref.tokenizer.decode(got).lower()
    return {"kl": kl / count, "top1": agree / count, "positions": count, "greedy_prefix": float(np.mean(same)),
            "answered": f"{answered}/{len(CHATS)}"}


def batch_invariance(dtype: str, quantization: str, count: int) -> str:
    """How many of `count` random prompts decode the same greedy tokens alone and batched."""
    import jaxserve

    engine = jaxserve.Engine(None, dtype=dtype, quantization=quantization, log_level="warning")
    try:
        rng = np.random.default_rng()
        batch = [rng.integers(100, 40000, size=int(rng.integers(5, 40))).tolist() for _ in range(count)]
        params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
        alone = []
        for ids in batch:
            engine.flush_cache()
            alone.append(engine.generate(input_ids=ids, sampling_params=params)["output_ids"])
        together = [r["output_ids"] for r in engine.generate(input_ids=batch, sampling_params=params)]
        return f"{sum(a == b for a, b in zip(alone, together))}/{count}"
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    from jaxserve.weights import load

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", default=["float32:int8", "float32:fp8", "float32:gguf",
                                                         "bfloat16:none"])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--batch-invariance", type=int, default=0, metavar="N",
                        help="also count, of N random prompts, those decoding the same alone and batched")
    parser.add_argument("--quick", action="store_true", help="one format, 4 tokens (the test suite)")
    args = parser.parse_args(argv)
    if args.quick:
        args.formats, args.new_tokens = ["float32:int8"], 4
    ref = load(None, dtype="float32")
    ref_logp = [log_softmax(ref.logits(ids)) for ids in prompts(ref.tokenizer)]
    ref_greedy = [ref.generate_greedy(ids, args.new_tokens) for ids in prompts(ref.tokenizer)[:len(CHATS)]]
    extra = ("", "") if not args.batch_invariance else (" same alone and batched |", "---|")
    print("| format | mean KL (nats) | top-1 agreement | greedy tokens before the first difference | "
          f"chats answered |{extra[0]}")
    print(f"|---|---|---|---|---|{extra[1]}")
    for fmt in args.formats:
        dtype, quantization = fmt.split(":")
        r = compare(ref, load(None, dtype=dtype, quantization=quantization), ref_logp, ref_greedy, args.new_tokens)
        same = f" {batch_invariance(dtype, quantization, args.batch_invariance)} |" if args.batch_invariance else ""
        print(f"| {fmt} | {r['kl']:.4f} | {r['top1']:.3f} ({r['positions']} positions) | "
              f"{100 * r['greedy_prefix']:.0f}% | {r['answered']} |{same}", flush=True)


if __name__ == "__main__":
    main()
