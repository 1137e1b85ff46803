"""Our paged forward equals transformers on tiny random checkpoints of each family."""

import numpy as np
import pytest

from jaxserve.models import ForwardBatch, UnsupportedModelError
from jaxserve.weights import load
from tests.hf_models import FAMILIES, assert_logits_close, hf_logits, save_tiny_model

PAGE = 4
REL = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    # qwen2 is saved as several safetensors files with an index, the others as one file.
    save_tiny_model(request.param, path, seed=len(request.param), max_shard_size="100KB" if request.param == "qwen2" else None)
    rng = np.random.default_rng(len(request.param))
    ids = [rng.integers(3, 256, size=n) for n in (23, 17, 9)]
    model = load(path, dtype="float32", page_size=PAGE, with_tokenizer=False)
    assert len(list(path.glob("*.safetensors"))) > 1 or request.param != "qwen2"
    return model, ids, [hf_logits(path, x) for x in ids]


def pages_for(rng, n_seqs, max_pages=8, pool=64):
    """Disjoint, permuted, non-contiguous pages for each sequence."""
    perm = rng.permutation(np.arange(1, pool))
    return [perm[i * max_pages : (i + 1) * max_pages] for i in range(n_seqs)]


def run_steps(model, steps, pool=64, pad=3):
    """steps: list of batches, each a list of (seq, ids, start, pages); logits per seq, in order.

    Each batch gets `pad` padded tokens and `pad` - 1 padded sequences (pad 1 with one
    token per sequence makes a decode-only batch)."""
    k, v = model.new_kv_cache(pool)
    out = {}
    for step in steps:
        batch = ForwardBatch.build([(ids, start, pages) for _, ids, start, pages in step], model.page_size,
                                   num_tokens=sum(len(s[1]) for s in step) + pad, max_seqs=len(step) + pad)
        logits, k, v = model.forward(batch, k, v)
        logits = np.asarray(logits)
        t = 0
        for seq, ids, _, _ in step:
            out.setdefault(seq, []).append(logits[t : t + len(ids)])
            t += len(ids)
        assert np.all(logits[t:] == logits[t:][:1]) if t < len(logits) else True
    return {seq: np.concatenate(parts) for seq, parts in out.items()}


def test_one_shot_prefill(family):
    model, ids, refs = family
    assert_logits_close(model.logits(ids[0]), refs[0], REL)


def test_chunked_prefill(family):
    model, ids, refs = family
    pages = pages_for(np.random.default_rng(1), 1)[0]
    x = ids[0]
    cuts = [0, 5, 12, 16, len(x)]  # chunk boundaries inside and on page edges
    steps = [[(0, x[a:b], a, pages)] for a, b in zip(cuts, cuts[1:])]
    assert_logits_close(run_steps(model, steps)[0], refs[0], REL)


def test_token_by_token_decode(family):
    model, ids, refs = family
    pages = pages_for(np.random.default_rng(2), 1)[0]
    x = ids[1]
    steps = [[(0, x[:3], 0, pages)]] + [[(0, x[i : i + 1], i, pages)] for i in range(3, len(x))]
    assert_logits_close(run_steps(model, steps)[0], refs[1], REL)


def test_decode_only_batches(family):
    """Two sequences decoding together take the split-K decode path (T == max_seqs)."""
    model, ids, refs = family
    pages = pages_for(np.random.default_rng(4), 2)
    a, b = ids[0], ids[1]
    steps = [[(0, a[:6], 0, pages[0]), (1, b[:6], 0, pages[1])]]
    steps += [[(0, a[i : i + 1], i, pages[0]), (1, b[i : i + 1], i, pages[1])] for i in range(6, len(b))]
    batch = ForwardBatch.build([(a[6:7], 6, pages[0]), (b[6:7], 6, pages[1])], PAGE, num_tokens=3, max_seqs=3)
    assert batch.decode_only
    got = run_steps(model, steps, pad=1)
    assert_logits_close(got[0], refs[0][: len(b)], REL)
    assert_logits_close(got[1], refs[1], REL)


def test_ragged_batch_mixed(family):
    """One call mixes an extend on a cached prefix, a decode and a fresh prefill."""
    model, ids, refs = family
    pages = pages_for(np.random.default_rng(3), 3)
    a, b, c = ids
    steps = [
        [(0, a[:10], 0, pages[0]), (1, b[:16], 0, pages[1])],
        [(0, a[10:], 10, pages[0]), (1, b[16:], 16, pages[1]), (2, c, 0, pages[2])],
    ]
    got = run_steps(model, steps)
    for seq, ref in enumerate(refs):
        assert_logits_close(got[seq], ref, REL)


def test_unknown_architecture_is_clear(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        load(tmp_path, with_tokenizer=False)


@pytest.mark.parametrize("backend", ["triton", "tpu"])
def test_pallas_backend_equals_reference(tmp_path_factory, caplog, backend):
    """The model with Pallas kernels (interpret mode on CPU) gives the reference backend's logits."""
    path = tmp_path_factory.mktemp(f"pallas-{backend}")
    save_tiny_model("llama3", path, seed=5, hidden_size=128, head_dim=64, num_attention_heads=4)
    rng = np.random.default_rng(9)
    pages = pages_for(rng, 3)
    a, b, c = (rng.integers(3, 256, size=n) for n in (20, 13, 6))
    steps = [
        [(0, a[:9], 0, pages[0]), (1, b[:12], 0, pages[1])],
        [(0, a[9:], 9, pages[0]), (1, b[12:], 12, pages[1]), (2, c, 0, pages[2])],
    ]
    results = []
    for attention_backend in ("reference", backend):
        model = load(path, dtype="float32", page_size=8, attention_backend=attention_backend, with_tokenizer=False)
        with caplog.at_level("WARNING", logger="pallas_kernels"):
            results.append(run_steps(model, steps))
    assert "using the jnp reference" not in caplog.text  # the kernel really ran
    for seq in range(3):
        np.testing.assert_allclose(results[1][seq], results[0][seq], rtol=1e-5, atol=1e-5)
