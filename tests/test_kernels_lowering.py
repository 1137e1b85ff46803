"""Every kernel lowers for its accelerator, on this CPU-only machine.

`jax.jit(f).trace(...).lower(lowering_platforms=(...))` runs the Pallas -> Triton
(cuda) and Pallas -> Mosaic (tpu) lowerings, including the MLIR verifiers, for the
shapes the engine serves. What it cannot check without the device: Triton's and
Mosaic's own backend compilation (register/VMEM allocation, Mosaic layout passes).
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import tpu_decode, tpu_ragged, triton_decode, triton_ragged

# (num_q_heads, num_kv_heads, head_dim, page_size)
MODELS = {"smollm2": (9, 3, 64, 16), "llama3-8b": (32, 8, 128, 16)}
TOKENS, MAX_SEQS, PAGES_PER_SEQ, NUM_PAGES = 256, 32, 128, 4096
PLATFORM = {"triton": "cuda", "tpu": "tpu"}
RAGGED = {"triton": triton_ragged.ragged_paged_attention, "tpu": tpu_ragged.ragged_paged_attention}
DECODE = {"triton": triton_decode.paged_decode, "tpu": tpu_decode.paged_decode}


def shapes(model, dtype, decode):
    hq, hkv, d, s = MODELS[model]
    i32 = jnp.int32
    pages = jax.ShapeDtypeStruct((NUM_PAGES, s, hkv, d), dtype)
    table = jax.ShapeDtypeStruct((MAX_SEQS, PAGES_PER_SEQ), i32)
    lens = jax.ShapeDtypeStruct((MAX_SEQS,), i32)
    if decode:
        return (jax.ShapeDtypeStruct((MAX_SEQS, hq, d), dtype), pages, pages, lens, table)
    return (jax.ShapeDtypeStruct((TOKENS, hq, d), dtype), pages, pages, lens, table,
            jax.ShapeDtypeStruct((MAX_SEQS + 1,), i32), jax.ShapeDtypeStruct((1,), i32))


def lower(fn, args, platform):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return text


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("kernel", sorted(PLATFORM))
def test_ragged_kernel_lowers(kernel, model, dtype):
    fn = functools.partial(RAGGED[kernel], sm_scale=0.125)
    text = lower(fn, shapes(model, dtype, decode=False), PLATFORM[kernel])
    assert ("__gpu$xla.gpu.triton" if kernel == "triton" else "tpu_custom_call") in text


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("kernel", sorted(PLATFORM))
def test_decode_kernel_lowers(kernel, model, dtype):
    fn = functools.partial(DECODE[kernel], sm_scale=0.125, num_splits=4)
    text = lower(fn, shapes(model, dtype, decode=True), PLATFORM[kernel])
    assert ("__gpu$xla.gpu.triton" if kernel == "triton" else "tpu_custom_call") in text


@pytest.mark.parametrize("kernel", sorted(PLATFORM))
def test_kernels_lower_with_soft_cap_and_window(kernel):
    kw = dict(sm_scale=0.125, soft_cap=30.0, sliding_window=512)
    lower(functools.partial(RAGGED[kernel], **kw), shapes("llama3-8b", jnp.bfloat16, False), PLATFORM[kernel])
    lower(functools.partial(DECODE[kernel], **kw), shapes("llama3-8b", jnp.bfloat16, True), PLATFORM[kernel])


@pytest.mark.parametrize("kernel", sorted(PLATFORM))
def test_kernels_lower_per_device_under_tensor_parallelism(kernel):
    """With tp=2 the kernels run under shard_map over the KV heads: each device's program
    is the kernel on half the heads (llama3-8b: 16 query and 4 KV heads each)."""
    from jax.sharding import Mesh
    import numpy as np

    from pallas_kernels.dispatch import _on_each_device

    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("data", "model"))
    for fn, decode in ((functools.partial(DECODE[kernel], sm_scale=0.125, num_splits=4), True),
                       (functools.partial(RAGGED[kernel], sm_scale=0.125), False)):
        text = lower(functools.partial(_on_each_device, fn, mesh), shapes("llama3-8b", jnp.bfloat16, decode),
                     PLATFORM[kernel])
        assert ("__gpu$xla.gpu.triton" if kernel == "triton" else "tpu_custom_call") in text
        assert "sdy.manual_computation" in text
        assert "tensor<4096x16x4x128xbf16>" in text  # each device's program sees its 4 of the 8 KV heads
