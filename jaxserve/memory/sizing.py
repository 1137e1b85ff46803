"""How many KV pages to preallocate.

The pool is allocated once, so its size is decided once, from (in this order):

1. ``--max-total-tokens`` when given (rounded down to whole pages); with device memory
   stats it is checked to fit next to the weights;
2. else ``--mem-fraction-static`` of device memory: the weights, the KV pool and a
   workspace estimate together take that fraction of ``bytes_limit``; the rest is left
   for activations, logits and the compiler;
3. else (CPU: ``memory_stats()`` is None) a fixed 1 GiB KV budget capped at 65,536
   tokens, grown if needed to hold one request of ``context_length``.

With tensor parallelism pass per-device numbers: the weights bytes on one device and the
KV bytes per token of the KV heads one device holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "DEFAULT_MEM_FRACTION_STATIC",
    "KVPoolSize",
    "KVPoolSizeError",
    "kv_bytes_per_token",
    "read_device_memory_stats",
    "size_kv_pool",
]

DEFAULT_MEM_FRACTION_STATIC = 0.85
# Held back from the static budget for buffers outside the weights and the pool.
DEFAULT_WORKSPACE_BYTES = 256 << 20
# CPU has no memory stats: a budget that is generous for small models, bounded for big.
CPU_KV_BUDGET_BYTES = 1 << 30
CPU_MAX_TOTAL_TOKENS = 65536
# The smallest pool worth serving from when no context length says otherwise.
MIN_POOL_TOKENS = 256


class KVPoolSizeError(ValueError):
    """The model and a minimal KV pool do not fit; the message names the flag to change."""


@dataclass(frozen=True)
class KVPoolSize:
    """The decided pool size; ``num_pages`` includes the dummy page 0."""

    num_pages: int
    page_size: int
    max_total_tokens: int  # usable tokens: (num_pages - 1) * page_size
    kv_bytes_per_token: int
    kv_bytes: int  # the whole pool, dummy page included
    weights_bytes: int
    source: Literal["max_total_tokens", "mem_fraction_static", "cpu_default"]

    def log_line(self) -> str:
        """One line for the startup log."""
        return (
            f"KV pool: weights {_fmt_bytes(self.weights_bytes)}, "
            f"KV {self.kv_bytes_per_token} B/token, {self.num_pages} pages "
            f"(incl. dummy) x page_size {self.page_size} = max {self.max_total_tokens} tokens, "
            f"{_fmt_bytes(self.kv_bytes)} (from {self.source})"
        )


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: Any) -> int:
    """Bytes of K and V for one token over all layers: 2 * layers * kv_heads * head_dim *
    itemsize. ``dtype`` is anything ``jnp.dtype`` takes ("bfloat16", jnp.float32, ...)."""
    import jax.numpy as jnp  # lazily: the allocator and radix cache need no jax

    return 2 * num_layers * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize


def read_device_memory_stats() -> dict[str, int] | None:
    """``memory_stats()`` of the first device, or None where the backend has none (CPU)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return dict(stats)


def size_kv_pool(
    *,
    weights_bytes: int,
    kv_bytes_per_token: int,
    page_size: int,
    max_total_tokens: int | None = None,
    mem_fraction_static: float | None = None,
    context_length: int | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    memory_stats: Mapping[str, int] | None | Literal["device"] = "device",
) -> KVPoolSize:
    """Decide the KV pool size (see the module doc for the rules).

    ``memory_stats`` is read from the first device by default; pass a mapping with
    ``bytes_limit`` (and optionally ``bytes_in_use``) or None to size without a device,
    e.g. in tests. ``bytes_in_use`` may or may not already include the weights: the
    larger of it and ``weights_bytes`` is counted. The pool must hold one request of
    ``context_length`` tokens (or ``MIN_POOL_TOKENS``); otherwise this raises
    :class:`KVPoolSizeError` saying which flag to change.
    """
    if page_size < 1 or kv_bytes_per_token < 1 or weights_bytes < 0 or workspace_bytes < 0:
        raise ValueError(
            f"bad sizing inputs: page_size={page_size}, kv_bytes_per_token={kv_bytes_per_token}, "
            f"weights_bytes={weights_bytes}, workspace_bytes={workspace_bytes}"
        )
    fraction = DEFAULT_MEM_FRACTION_STATIC if mem_fraction_static is None else mem_fraction_static
    if not 0.0 < fraction <= 1.0:
        raise KVPoolSizeError(f"--mem-fraction-static must be in (0, 1], got {fraction}")
    if memory_stats == "device":
        memory_stats = read_device_memory_stats()
    page_bytes = page_size * kv_bytes_per_token
    min_tokens = context_length if context_length else MIN_POOL_TOKENS
    min_pages = math.ceil(min_tokens / page_size)
    need = (
        f"one request of {min_tokens} tokens needs {min_pages} pages of {page_size} tokens "
        f"({_fmt_bytes((min_pages + 1) * page_bytes)} of KV at {kv_bytes_per_token} B/token)"
    )

    if max_total_tokens is not None:
        usable = max_total_tokens // page_size
        if usable < min_pages:
            raise KVPoolSizeError(
                f"--max-total-tokens {max_total_tokens} is too small: {need}; "
                f"raise --max-total-tokens or lower --context-length"
            )
        if memory_stats is not None:
            in_use = max(memory_stats.get("bytes_in_use", 0), weights_bytes)
            total = in_use + (usable + 1) * page_bytes + workspace_bytes
            if total > memory_stats["bytes_limit"]:
                raise KVPoolSizeError(
                    f"--max-total-tokens {max_total_tokens} needs {_fmt_bytes(total)} with the "
                    f"weights ({_fmt_bytes(weights_bytes)}) but the device has "
                    f"{_fmt_bytes(memory_stats['bytes_limit'])}; lower --max-total-tokens"
                )
        return _result(usable, page_size, kv_bytes_per_token, weights_bytes, "max_total_tokens")

    if memory_stats is None:
        tokens = min(CPU_KV_BUDGET_BYTES // kv_bytes_per_token, CPU_MAX_TOTAL_TOKENS)
        usable = max(tokens // page_size, min_pages)
        return _result(usable, page_size, kv_bytes_per_token, weights_bytes, "cpu_default")

    limit = memory_stats["bytes_limit"]
    in_use = max(memory_stats.get("bytes_in_use", 0), weights_bytes)
    static_budget = int(fraction * limit)
    if in_use + workspace_bytes >= static_budget:
        raise KVPoolSizeError(
            f"the model weights ({_fmt_bytes(weights_bytes)}, {_fmt_bytes(in_use)} in use) and "
            f"workspace ({_fmt_bytes(workspace_bytes)}) leave no KV memory in "
            f"--mem-fraction-static {fraction} of {_fmt_bytes(limit)}; raise "
            f"--mem-fraction-static, raise --tp-size, or use a smaller model"
        )
    usable = (static_budget - in_use - workspace_bytes) // page_bytes - 1  # minus dummy page
    if usable < min_pages:
        raise KVPoolSizeError(
            f"--mem-fraction-static {fraction} of {_fmt_bytes(limit)} leaves room for "
            f"{max(usable, 0) * page_size} KV tokens next to the weights, but {need}; lower "
            f"--context-length or raise --mem-fraction-static"
        )
    return _result(usable, page_size, kv_bytes_per_token, weights_bytes, "mem_fraction_static")


def _result(usable_pages: int, page_size: int, kv_per_token: int, weights_bytes: int,
            source: Literal["max_total_tokens", "mem_fraction_static", "cpu_default"]) -> KVPoolSize:
    num_pages = usable_pages + 1
    return KVPoolSize(
        num_pages=num_pages,
        page_size=page_size,
        max_total_tokens=usable_pages * page_size,
        kv_bytes_per_token=kv_per_token,
        kv_bytes=num_pages * page_size * kv_per_token,
        weights_bytes=weights_bytes,
        source=source,
    )


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
