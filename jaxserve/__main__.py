"""Command line: `python -m jaxserve {serve,convert} ...`."""

from __future__ import annotations

import argparse
import logging
import sys


def _serve(args) -> None:
    # Until the HTTP server lands, `serve` loads the model and answers one chat prompt.
    from jaxserve.models import load

    model = load(args.model_path, dtype=args.dtype, tp_size=args.tp_size, page_size=args.page_size)
    messages = [{"role": "user", "content": args.prompt}]
    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    out = model.generate_greedy(ids, args.max_new_tokens, stop_ids=model.tokenizer.eos_token_ids)
    print(model.tokenizer.decode(out))


def _convert(args) -> None:
    from jaxserve.weights.convert import convert

    print(convert(args.model_path, args.output, dtype=args.dtype))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxserve")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model (for now: answer one prompt)")
    convert = sub.add_parser("convert", help="convert a HF dir or GGUF file to an orbax checkpoint dir")
    for p in (serve, convert):
        p.add_argument("--model-path", default=None, help="HF dir, .gguf file or converted dir (default: bundled SmolLM2)")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--tp-size", type=int, default=1)
    serve.add_argument("--page-size", type=int, default=16)
    serve.add_argument("--prompt", default="What is the capital of France?")
    serve.add_argument("--max-new-tokens", type=int, default=64)
    convert.add_argument("--output", required=True, help="directory to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
    {"serve": _serve, "convert": _convert}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
