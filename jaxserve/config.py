"""ServerArgs: every knob of the engine and server, with SGLang's flag names and validation."""

from __future__ import annotations

import argparse
import os
import dataclasses
import typing


class ServerArgsError(ValueError):
    """A flag value the engine cannot run with; the message names the flag and the fix."""


# CPU: steps of ~0.1 s, so small batches keep latency down; a lone prompt fills the step.
# The overlap loop is off: the host and the "device" share the same cores, so overlapping
# them gains nothing and newly arrived requests wait a step longer (docs/BENCHMARKS.md).
# GPU / TPU: SGLang's defaults for a large accelerator, overlap loop on.
BACKEND_DEFAULTS = {
    "cpu": {"max_running_requests": 32, "max_prefill_tokens": 512, "chunked_prefill_size": 512,
            "disable_overlap_schedule": True},
    "accelerator": {"max_running_requests": 256, "max_prefill_tokens": 16384, "chunked_prefill_size": 8192,
                    "disable_overlap_schedule": False},
}


CLI_ALIASES = {"tp_size": ("--tensor-parallel-size",)}  # SGLang's other names for the same flag
QUANTIZATIONS = ("auto", "none", "int8", "w8a16", "fp8", "gguf")  # weights/quantization.py


@dataclasses.dataclass
class ServerArgs:
    model_path: str | None = None  # HF dir, .gguf, converted dir; None = bundled SmolLM2
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on GPU/TPU
    quantization: str = "auto"  # auto | none | int8 | w8a16 | fp8 | gguf: weights stored quantized (weights/quantization.py)
    tp_size: int = 1
    page_size: int = 16
    max_total_tokens: int | None = None  # KV pool size in tokens; default from mem_fraction_static
    mem_fraction_static: float = 0.85
    # None = per backend (see BACKEND_DEFAULTS): small on CPU, SGLang-like on GPU / TPU.
    max_running_requests: int | None = None  # also the largest decode batch (a compiled bucket)
    chunked_prefill_size: int | None = None  # longest prefill chunk of one request; -1 disables chunking
    max_prefill_tokens: int | None = None  # token budget of one step (prefill chunks + decode tokens)
    schedule_policy: str = "fcfs"  # fcfs | lpm
    disable_radix_cache: bool = False
    context_length: int | None = None  # default: the model's max_position_embeddings
    attention_backend: str = "auto"  # auto | reference | pallas | triton | tpu
    # Plan step N+1 only after step N's results are back (None = per backend; the CLI also
    # takes --no-disable-overlap-schedule to turn the overlap loop on where it is off).
    disable_overlap_schedule: bool | None = None
    # Constrained decoding: append the tokens a grammar forces in one step (jump-forward),
    # and the whitespace JSON may have between tokens (None: compact, `{"a": 1, "b": 2}`).
    disable_jump_forward: bool = False
    constrained_json_whitespace_pattern: str | None = None
    # Hierarchical KV cache (memory/hicache.py): evicted prefixes kept in host memory (L2)
    # and on storage (L3), loaded back instead of recomputed.
    enable_hierarchical_cache: bool = False
    hicache_ratio: float = 2.0  # host pool size as a multiple of the device pool
    hicache_size: float | None = None  # host pool size in GB (instead of the ratio)
    hicache_write_policy: str = "write_through"  # write_through | write_through_selective | write_back
    hicache_storage_backend: str | None = None  # file
    hicache_storage_dir: str | None = None
    hicache_storage_prefetch_policy: str = "best_effort"  # best_effort | wait_complete | timeout
    hicache_storage_prefetch_timeout: float = 2.0  # seconds admission waits, with the timeout policy
    # Query-aware sparse decode attention (Quest, pallas_kernels/sparse.py): a decode step
    # of a sequence with at least `min_context` tokens reads at most `token_budget` of them.
    sparse_attention: str = "none"  # none | quest
    sparse_attention_token_budget: int = 1024
    sparse_attention_min_context: int = 2048
    attention_sparsity_threshold: float | None = None  # also drop pages whose bounded share is below it
    compilation_cache_dir: str | None = None
    profile_dir: str | None = None  # where /start_profile traces go (a new folder each); default: the temp dir
    chat_template: str | None = None
    random_seed: int = 0
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    session_timeout: float = 600.0
    # Bounds on what clients can make the server hold (503 + Retry-After beyond them).
    max_queued_requests: int | None = None  # requests waiting for admission; None: no bound
    max_sessions: int = 1024  # open sessions
    max_request_body_bytes: int = 32 << 20  # larger bodies get 413
    served_model_name: str | None = None
    log_level: str = "info"
    # Scale-out (docs/DEPLOYMENT.md): replicas behind SGLang's router, and one model over the
    # devices of several hosts on JAX's multi-controller runtime (jaxserve/distributed/).
    dp_size: int = 1  # replicas, each its own process, behind `sglang_router` on --port
    router_policy: str = "cache_aware"  # cache_aware | round_robin | power_of_two | random
    nnodes: int = 1  # processes (hosts) that share one model
    node_rank: int = 0  # this process; 0 runs the scheduler and the HTTP server
    dist_init_addr: str | None = None  # HOST:PORT of node 0's coordinator (bound on node 0)
    dist_timeout: int = 10  # seconds: a peer silent this long ends every process

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ServerArgsError(message)

        need(self.page_size >= 1, f"--page-size must be >= 1, got {self.page_size}")
        need(self.tp_size >= 1, f"--tp-size must be >= 1, got {self.tp_size}")
        need(self.max_running_requests is None or self.max_running_requests >= 1,
             "--max-running-requests must be >= 1")
        need(self.chunked_prefill_size in (None, -1) or self.chunked_prefill_size >= 1,
             "--chunked-prefill-size must be >= 1, or -1 to disable chunking")
        need(self.max_prefill_tokens is None or self.max_prefill_tokens >= 1, "--max-prefill-tokens must be >= 1")
        need(0.0 < self.mem_fraction_static <= 1.0, "--mem-fraction-static must be in (0, 1]")
        need(self.max_total_tokens is None or self.max_total_tokens >= self.page_size,
             "--max-total-tokens must hold at least one page")
        need(self.schedule_policy in ("fcfs", "lpm"), f"--schedule-policy must be fcfs or lpm, got {self.schedule_policy!r}")
        need(self.attention_backend in ("auto", "reference", "pallas", "triton", "tpu"),
             f"--attention-backend must be auto, reference, pallas, triton or tpu, got {self.attention_backend!r}")
        need(self.context_length is None or self.context_length >= 2, "--context-length must be >= 2")
        self.dtype = {"half": "float16", "float": "float32"}.get(self.dtype, self.dtype)  # SGLang's aliases
        need(self.dtype in ("auto", "float32", "bfloat16", "float16"),
             f"--dtype must be auto, float32, bfloat16, float16 or half, got {self.dtype!r}")
        need(self.quantization in QUANTIZATIONS,
             f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        need(self.max_queued_requests is None or self.max_queued_requests >= 1, "--max-queued-requests must be >= 1")
        need(self.max_sessions >= 1, "--max-sessions must be >= 1")
        need(self.max_request_body_bytes >= 1024, "--max-request-body-bytes must be >= 1024")
        self._validate_hicache(need)
        self._validate_scale_out(need)

    def _validate_scale_out(self, need) -> None:
        need(self.dp_size >= 1, f"--dp-size must be >= 1, got {self.dp_size}")
        policies = ("cache_aware", "round_robin", "power_of_two", "random")
        need(self.router_policy in policies,
             f"--router-policy must be one of {', '.join(policies)}, got {self.router_policy!r}")
        need(self.nnodes >= 1, f"--nnodes must be >= 1, got {self.nnodes}")
        need(0 <= self.node_rank < self.nnodes, f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        need(self.dist_timeout >= 1, f"--dist-timeout must be >= 1 second, got {self.dist_timeout}")
        if self.nnodes > 1:
            host, _, port = (self.dist_init_addr or "").rpartition(":")
            need(bool(host) and port.isdigit(),
                 f"--nnodes {self.nnodes} needs --dist-init-addr HOST:PORT (node 0's address), got {self.dist_init_addr!r}")
            need(self.dp_size == 1, "--dp-size with --nnodes: start one multi-node replica per router worker instead")
            need(not self.enable_hierarchical_cache, "--enable-hierarchical-cache is not supported with --nnodes > 1")

    def _validate_hicache(self, need) -> None:
        need(self.sparse_attention in ("none", "quest"),
             f"--sparse-attention must be none or quest, got {self.sparse_attention!r}")
        need(self.sparse_attention_token_budget >= 2 * self.page_size,
             f"--sparse-attention-token-budget must be at least 2 pages ({2 * self.page_size} tokens: the first "
             f"page and the last one are always read), got {self.sparse_attention_token_budget}")
        need(self.sparse_attention_min_context >= 0, "--sparse-attention-min-context must be >= 0")
        need(self.attention_sparsity_threshold is None or 0 < self.attention_sparsity_threshold < 1,
             f"--attention-sparsity-threshold must be in (0, 1), got {self.attention_sparsity_threshold}")
        need(self.hicache_ratio >= 1.0, f"--hicache-ratio must be >= 1 (the host pool is at least as large as the "
             f"device pool), got {self.hicache_ratio}")
        need(self.hicache_size is None or self.hicache_size > 0, "--hicache-size must be > 0 GB")
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
        need(self.hicache_size is None or self.hicache_size <= memory_gb,
             f"--hicache-size {self.hicache_size} GB is more than this machine's {memory_gb:.1f} GB of memory")
        need(self.hicache_write_policy in ("write_through", "write_through_selective", "write_back"),
             "--hicache-write-policy must be write_through, write_through_selective or write_back, "
             f"got {self.hicache_write_policy!r}")
        need(self.hicache_storage_prefetch_policy in ("best_effort", "wait_complete", "timeout"),
             "--hicache-storage-prefetch-policy must be best_effort, wait_complete or timeout, "
             f"got {self.hicache_storage_prefetch_policy!r}")
        need(self.hicache_storage_prefetch_timeout >= 0, "--hicache-storage-prefetch-timeout must be >= 0")
        need(self.hicache_storage_backend in (None, "file"),
             f"--hicache-storage-backend must be file, got {self.hicache_storage_backend!r}")
        need(self.hicache_storage_backend is None or self.enable_hierarchical_cache,
             "--hicache-storage-backend needs --enable-hierarchical-cache")
        need(self.hicache_storage_backend is None or bool(self.hicache_storage_dir),
             "--hicache-storage-backend file needs --hicache-storage-dir")
        need(not (self.enable_hierarchical_cache and self.disable_radix_cache),
             "--enable-hierarchical-cache needs the radix cache; drop --disable-radix-cache")

    def with_backend_defaults(self, backend: str) -> "ServerArgs":
        """A copy with every per-backend default (None) filled in for `backend`."""
        defaults = BACKEND_DEFAULTS["cpu" if backend == "cpu" else "accelerator"]
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.chunked_prefill_size is None and self.max_prefill_tokens is not None:
            # One lone long prompt fills the step budget.
            filled["chunked_prefill_size"] = min(self.max_prefill_tokens, defaults["chunked_prefill_size"])
        return dataclasses.replace(self, **filled)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One `--flag-name` per field, typed from the annotation (plus SGLang's aliases)."""
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            flags = ["--" + field.name.replace("_", "-"), *CLI_ALIASES.get(field.name, ())]
            hint = hints[field.name]
            if hint is bool:
                parser.add_argument(*flags, action="store_true", default=field.default)
                continue
            if hint == bool | None:  # a per-backend default: --flag / --no-flag
                parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=field.default)
                continue
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            parser.add_argument(*flags, type=base, default=field.default)
        parser.add_argument("--trust-remote-code", action="store_true",
                            help="accepted for SGLang compatibility; jaxserve runs no model code from the hub")

    def to_cli(self, **overrides) -> list[str]:
        """The flags that give this config (fields at their default are left out)."""
        flags = []
        for field in dataclasses.fields(self):
            value = overrides.get(field.name, getattr(self, field.name))
            if value == field.default:
                continue
            flag = "--" + field.name.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + flag[2:])
            else:
                flags += [flag, str(value)]
        return flags

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "ServerArgs":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_kwargs(cls, **kwargs) -> "ServerArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ServerArgsError(f"unknown server args {unknown}; valid: {', '.join(sorted(names))}")
        return cls(**kwargs)
