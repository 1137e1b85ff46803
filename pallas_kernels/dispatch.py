"""One API over the attention backends: pick an implementation, fall back when needed.

impl names:
  "reference"  pure jnp (`reference.py`, `decode_reference.py`); the CPU backend.
  "triton"     Pallas GPU kernels through the Triton lowering.
  "tpu"        Pallas TPU kernels through Mosaic.
  "pallas"     the kernel of the default backend (gpu -> triton, tpu -> tpu; on CPU it
               needs interpret=True and runs the Triton kernel in interpret mode).
  "auto"       gpu -> triton, tpu -> tpu, anything else -> reference.
A kernel that cannot run a shape (e.g. a head_dim that is not a power of two on GPU)
falls back to the reference, with one log line per distinct reason.

With a `mesh` whose "model" axis splits the KV heads (tensor parallelism), a kernel runs
under `shard_map`: each device attends with its own query and KV heads (whole GQA
groups), and nothing is gathered. XLA partitions the jnp reference by itself.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import decode_reference, reference, tpu_decode, tpu_ragged, triton_decode, triton_ragged
from pallas_kernels import tpu_pages, triton_pages

logger = logging.getLogger("pallas_kernels")

IMPLS = ("auto", "reference", "triton", "tpu", "pallas")
_KERNEL_PLATFORM = {"triton": ("gpu", "cuda", "rocm"), "tpu": ("tpu",)}
_UNSUPPORTED = {"triton": triton_pages.unsupported_reason, "tpu": tpu_pages.unsupported_reason}
# The kernels themselves, without dispatch or fallback (tests and benchmarks call them).
KERNELS = {
    "triton": {"ragged": triton_ragged.ragged_paged_attention, "decode": triton_decode.paged_decode},
    "tpu": {"ragged": tpu_ragged.ragged_paged_attention, "decode": tpu_decode.paged_decode},
}
_logged_reasons: set[str] = set()


def resolve_impl(impl: str, interpret=False) -> str:
    """Map an impl name to "reference", "triton" or "tpu" for the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    backend = jax.default_backend()
    by_backend = "triton" if backend in _KERNEL_PLATFORM["triton"] else "tpu" if backend == "tpu" else None
    if impl == "auto":
        return by_backend or "reference"
    if impl == "pallas":
        if by_backend is None and not interpret:
            raise ValueError(f"impl='pallas' has no kernel for backend {backend!r}; pass interpret=True")
        return by_backend or "triton"
    if impl in _KERNEL_PLATFORM and not interpret and backend not in _KERNEL_PLATFORM[impl]:
        raise ValueError(f"impl={impl!r} cannot run natively on backend {backend!r}; pass interpret=True")
    return impl


def _fallback_reason(impl, op, q, k_pages):
    if impl == "reference":
        return None
    reason = _UNSUPPORTED[impl](q, k_pages)
    if reason is not None:
        message = f"{op}: the {impl} kernel does not support {reason}; using the jnp reference"
        if message not in _logged_reasons:
            _logged_reasons.add(message)
            logger.warning(message)
    return reason


def _check_heads(q, k_pages, v_pages):
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    if q.shape[-1] != k_pages.shape[-1] or q.shape[-2] % k_pages.shape[2]:
        raise ValueError(f"q {q.shape} does not fit KV pages {k_pages.shape} (head_dim, GQA ratio)")


def _on_each_device(kernel, mesh, q, k_pages, v_pages, *rest):
    """`kernel(q, k_pages, v_pages, *rest)`, per device over its heads when `mesh` splits
    both the query heads and the KV heads; the other arguments are whole on every device."""
    tp = 1 if mesh is None else mesh.shape.get("model", 1)
    if tp == 1 or q.shape[-2] % tp or k_pages.shape[2] % tp:
        return kernel(q, k_pages, v_pages, *rest)
    heads, pages = P(None, "model", None), P(None, None, "model", None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(heads, pages, pages, *(P(),) * len(rest)), out_specs=heads,
                         check_vma=False)(q, k_pages, v_pages, *rest)


def ragged_paged_attention(
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
    sm_scale, soft_cap=None, sliding_window=None, impl="auto", interpret=False, mesh=None, **tuning,
):
    """Attention of a ragged batch (prefill, extend and decode mixed) over paged KV.

    q [T, Hq, D]; k_pages, v_pages [num_pages, page_size, Hkv, D]; kv_lens [max_seqs];
    page_table [max_seqs, pages_per_seq]; cu_q_lens [max_seqs + 1]; num_seqs [1].
    Returns [T, Hq, D]; padded tokens give zeros. See `reference.py` for the
    conventions. `tuning` (block_q, block_kv, ...) goes to the kernel, if one runs.
    """
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs = map(
        jnp.asarray, (q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs))
    _check_heads(q, k_pages, v_pages)
    impl = resolve_impl(impl, interpret)
    if impl == "reference" or _fallback_reason(impl, "ragged_paged_attention", q, k_pages):
        return reference.ragged_paged_attention(
            q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
            sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    kernel = functools.partial(KERNELS[impl]["ragged"], sm_scale=sm_scale, soft_cap=soft_cap,
                               sliding_window=sliding_window, interpret=interpret, **tuning)
    return _on_each_device(kernel, mesh, q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)


def default_num_splits(batch: int, num_kv_heads: int, impl: str) -> int:
    """Split-K factor so that batch x kv_heads x splits fills the device about twice."""
    if impl == "triton":
        # One program per SM at a time; H100 has 132.
        units = getattr(jax.devices()[0], "core_count", None) or 132
    else:
        units = 2  # TPU programs run one after another per TensorCore
    return max(1, min(32, -(-2 * units // (batch * num_kv_heads))))


def paged_decode(
    q, k_pages, v_pages, kv_lens, page_table, *,
    sm_scale, soft_cap=None, sliding_window=None, impl="auto", interpret=False,
    num_splits=None, mesh=None, **tuning,
):
    """Decode attention, one query token per sequence, split-K over the pages.

    q [B, Hq, D]; k_pages, v_pages [num_pages, page_size, Hkv, D]; kv_lens [B] (the
    query sits at position kv_len - 1; kv_len 0 gives zeros); page_table [B,
    pages_per_seq]. num_splits=None picks one from the batch and device. Returns
    [B, Hq, D].
    """
    q, k_pages, v_pages, kv_lens, page_table = map(jnp.asarray, (q, k_pages, v_pages, kv_lens, page_table))
    _check_heads(q, k_pages, v_pages)
    impl = resolve_impl(impl, interpret)
    if num_splits is None:
        num_splits = default_num_splits(q.shape[0], k_pages.shape[2], impl)
    if impl == "reference" or _fallback_reason(impl, "paged_decode", q, k_pages):
        return decode_reference.paged_decode(
            q, k_pages, v_pages, kv_lens, page_table, sm_scale=sm_scale, soft_cap=soft_cap,
            sliding_window=sliding_window, num_splits=num_splits)
    kernel = functools.partial(KERNELS[impl]["decode"], sm_scale=sm_scale, soft_cap=soft_cap,
                               sliding_window=sliding_window, num_splits=num_splits, interpret=interpret, **tuning)
    return _on_each_device(kernel, mesh, q, k_pages, v_pages, kv_lens, page_table)
