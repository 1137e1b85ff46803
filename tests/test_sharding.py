"""Tensor parallelism on 4 virtual CPU devices: same logits, really sharded params and KV."""

import jax
import numpy as np
import pytest

from jaxserve.models import ForwardBatch
from jaxserve.weights import load
from tests.hf_models import save_tiny_model

IDS = np.random.default_rng(5).integers(3, 256, size=19)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp")
    # 4 heads, 4 KV heads, vocab 256, MLP 128: every axis splits over 2 and 4 devices
    save_tiny_model("qwen2", path, seed=3, num_key_value_heads=4)
    return path


@pytest.fixture(scope="module")
def tp1_logits(model_dir):
    return load(model_dir, dtype="float32", with_tokenizer=False).logits(IDS)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_single_device(model_dir, tp1_logits, tp):
    assert len(jax.devices()) >= 4, "conftest sets --xla_force_host_platform_device_count=4"
    model = load(model_dir, dtype="float32", tp_size=tp, page_size=4, with_tokenizer=False)
    params = model.param_tree
    for arr, axis in [(params["layers"]["attn"]["q_proj"]["kernel"], 2),
                      (params["layers"]["mlp"]["down_proj"]["kernel"], 1),
                      (params["embed"]["embedding"], 0)]:
        assert len(arr.sharding.device_set) == tp
        assert arr.addressable_shards[0].data.shape[axis] == arr.shape[axis] // tp
    k, v = model.new_kv_cache(16)
    assert k.addressable_shards[0].data.shape[3] == k.shape[3] // tp
    batch = ForwardBatch.build([(IDS, 0, np.arange(1, 6)[::-1] * 3)], 4)
    logits, k, v = model.forward(batch, k, v)
    np.testing.assert_allclose(np.asarray(logits), tp1_logits, rtol=1e-5, atol=1e-5)
    assert k.addressable_shards[0].data.shape[3] == k.shape[3] // tp  # stays sharded through the step


def test_kv_replicated_when_heads_do_not_divide(tmp_path, caplog):
    save_tiny_model("llama_tied", tmp_path, seed=4)  # 1 KV head
    model = load(tmp_path, dtype="float32", tp_size=2, with_tokenizer=False)
    with caplog.at_level("INFO"):
        k, _ = model.new_kv_cache(4)
    assert k.sharding.is_fully_replicated and "replicated" in caplog.text


def test_quantized_tp_matches_single_device(model_dir):
    one = load(model_dir, dtype="float32", quantization="int8", with_tokenizer=False)
    two = load(model_dir, dtype="float32", quantization="int8", tp_size=2, with_tokenizer=False)
    q = two.param_tree["layers"]["attn"]["q_proj"]
    assert q["kernel"].dtype == np.int8 and q["kernel"].addressable_shards[0].data.shape[2] == q["kernel"].shape[2] // 2
    assert q["scale"].addressable_shards[0].data.shape[2] == q["scale"].shape[2] // 2  # scales follow the columns
    np.testing.assert_allclose(two.logits(IDS), one.logits(IDS), rtol=1e-5, atol=1e-5)


def test_tp_kernels_run_per_device_over_kv_heads(model_dir, tp1_logits):
    """With a kernel backend and tp=2, attention runs under shard_map over the KV heads
    (no gather of the pool): prefill (ragged kernel) and decode (split-K kernel), both in
    interpret mode, give the single-device reference logits."""
    model = load(model_dir, dtype="float32", tp_size=2, page_size=4, attention_backend="pallas", with_tokenizer=False)
    ref = load(model_dir, dtype="float32", page_size=4, with_tokenizer=False)
    pages = np.arange(1, 6)
    batch = ForwardBatch.build([(IDS, 0, pages)], 4)
    assert "shard_map" in str(jax.make_jaxpr(model._forward)(model.params, batch, *model.new_kv_cache(8)))
    logits, k, v = model.forward(batch, *model.new_kv_cache(8))
    np.testing.assert_allclose(np.asarray(logits), tp1_logits, rtol=1e-5, atol=1e-5)
    assert k.addressable_shards[0].data.shape[3] == k.shape[3] // 2
    # Decode: two sequences, one token each, over the prefilled pages (second sequence shorter).
    step = ForwardBatch.build([(np.array([7]), len(IDS), pages), (np.array([9]), 10, pages[:3])], 4)
    assert step.decode_only
    got, _, _ = model.forward(step, k, v)
    rk, rv = ref.new_kv_cache(8)
    _, rk, rv = ref.forward(batch, rk, rv)
    want, _, _ = ref.forward(step, rk, rv)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
