"""Command line: `python -m jaxserve {serve,convert} ...`."""

from __future__ import annotations

import argparse
import difflib
import logging
import sys


def _serve(args) -> None:
    from jaxserve.config import ServerArgs, ServerArgsError
    from jaxserve.server import serve

    try:
        server_args = ServerArgs.from_cli(args)
    except ServerArgsError as e:
        sys.exit(f"error: {e}")
    logging.getLogger().setLevel(server_args.log_level.upper())
    if args.trust_remote_code:
        logging.info("--trust-remote-code is accepted and ignored: jaxserve runs no model code from the hub")
    if server_args.nnodes > 1:
        from jaxserve.distributed.multihost import initialize

        try:
            initialize(server_args)  # before any other JAX call
        except ServerArgsError as e:
            sys.exit(f"error: {e}")
        if server_args.node_rank != 0:  # the model and pool as node 0 builds them, then node 0's calls
            from jaxserve.distributed.mirror import follow
            from jaxserve.engine.build import build_runner

            sys.exit(follow(build_runner(server_args).runner))
    if server_args.dp_size > 1:
        from jaxserve.distributed.data_parallel import serve_data_parallel

        sys.exit(serve_data_parallel(server_args, shutdown_timeout=args.shutdown_timeout))
    try:
        serve(server_args, shutdown_timeout=args.shutdown_timeout)
    except FileNotFoundError as e:  # --model-path: the message says where it looked
        sys.exit(f"error: {e}")


def _convert(args) -> None:
    from jaxserve.weights.convert import convert

    print(convert(args.model_path, args.output, dtype=args.dtype, quantization=args.quantization))


def main(argv: list[str] | None = None) -> None:
    from jaxserve.config import QUANTIZATIONS, ServerArgs

    parser = argparse.ArgumentParser(prog="python -m jaxserve")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over HTTP (SGLang-native and OpenAI-compatible APIs)")
    convert = sub.add_parser("convert", help="convert a HF dir or GGUF file to an orbax checkpoint dir")
    ServerArgs.add_cli_args(serve)
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    convert.add_argument("--model-path", default=None, help="HF dir, .gguf file or converted dir (default: bundled SmolLM2)")
    convert.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    convert.add_argument("--output", required=True, help="directory to write")
    convert.add_argument("--quantization", default="none", choices=[q for q in QUANTIZATIONS if q != "auto"],
                         help="store the weights quantized (gguf: keep a GGUF file's Q8_0/Q4_0/Q4_1/Q4_K blocks)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [o for action in (serve if args.command == "serve" else convert)._actions for o in action.option_strings]
        flag = unknown[0].split("=")[0]
        close = difflib.get_close_matches(flag, known, n=1)
        parser.error(f"unknown flag {flag}" + (f"; did you mean {close[0]}?" if close else ""))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
    {"serve": _serve, "convert": _convert}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
