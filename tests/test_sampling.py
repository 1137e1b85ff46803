"""SamplingParams validation and the on-device sampler against numpy references."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.errors import InvalidRequestError
from jaxserve.sampling import (
    SampleOutput,
    SamplingBatch,
    SamplingParams,
    adjust_logits,
    apply_penalties,
    filter_probs,
    sample,
    update_output_counts,
)

sample_jit = jax.jit(sample, static_argnames=("top_logprobs_num",))
adjust_jit = jax.jit(adjust_logits)

# ----------------------------------------------------------------------------- host side

BAD_FIELDS = [
    ({"max_new_tokens": "abc"}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"n": 2.0}, "n"),
    ({"top_k": 1.5}, "top_k"),
    ({"temperature": True}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": [0.5]}, "top_p"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", 3]}, "stop"),
    ({"stop_token_ids": 3}, "stop_token_ids"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
    ({"stop_token_ids": [1, True]}, "stop_token_ids"),
    ({"stop_regex": "(unclosed"}, "stop_regex"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"skip_special_tokens": "false"}, "skip_special_tokens"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
    ({"logit_bias": {"5": "big"}}, "logit_bias"),
    ({"sampling_seed": 1.5}, "sampling_seed"),
    ({"regex": 5}, "regex"),
    ({"bogus_field": 1}, "bogus_field"),
]


@pytest.mark.parametrize(("d", "field"), BAD_FIELDS)
def test_from_dict_rejects_bad_types(d, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams.from_dict(d)


def test_unknown_field_lists_valid_ones():
    with pytest.raises(InvalidRequestError, match="valid fields are: .*max_new_tokens.*temperature"):
        SamplingParams.from_dict({"temprature": 0.5})
    with pytest.raises(InvalidRequestError, match="sampling_params must be an object"):
        SamplingParams.from_dict([1, 2])


BAD_RANGES = [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 5000}, "max_new_tokens"),  # over the limit of 1000
    ({"min_new_tokens": -1}, "min_new_tokens"),
    ({"max_new_tokens": 3, "min_new_tokens": 5}, "min_new_tokens"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop_token_ids": [5, 100]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logit_bias": {"100": 1.0}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"sampling_seed": -1}, "sampling_seed"),
]


@pytest.mark.parametrize(("d", "field"), BAD_RANGES)
def test_validate_rejects_bad_ranges(d, field):
    params = SamplingParams.from_dict(d)  # types are fine
    with pytest.raises(InvalidRequestError, match=field):
        params.validate(vocab_size=100, max_new_tokens_limit=1000)


def test_good_inputs_and_defaults():
    # What SGLang's frontend sends: unused fields arrive as null and mean default.
    frontend = {
        "max_new_tokens": 16, "min_new_tokens": None, "n": None, "stop": "\n", "stop_token_ids": None,
        "stop_regex": None, "temperature": 0, "top_p": None, "top_k": -1, "min_p": None,
        "frequency_penalty": None, "presence_penalty": None, "ignore_eos": None, "regex": None,
        "json_schema": None, "skip_special_tokens": None, "spaces_between_special_tokens": None,
    }  # fmt: skip
    p = SamplingParams.from_dict(frontend)
    p.validate(vocab_size=100)
    assert p == SamplingParams(max_new_tokens=16, stop=["\n"], temperature=0.0)
    assert isinstance(p.temperature, float) and p.is_greedy
    assert SamplingParams.from_dict(None) == SamplingParams()
    assert not SamplingParams().is_greedy and SamplingParams(top_k=1).is_greedy

    p = SamplingParams.from_dict({"top_k": 0, "max_new_tokens": 0, "logit_bias": {"7": 2, 8: -1.5},
                                  "stop_token_ids": [0, 99], "sampling_seed": 2**40, "stop_regex": r"\d+"})  # fmt: skip
    p.validate(vocab_size=100, max_new_tokens_limit=0)
    assert p.logit_bias == {7: 2.0, 8: -1.5} and p.stop_regex == [r"\d+"]
    assert json.loads(json.dumps(p.to_dict()))["sampling_seed"] == 2**40


def test_stop_normalisation():
    assert SamplingParams.from_dict({"stop": "END"}).stop == ["END"]
    assert SamplingParams.from_dict({"stop": ["a", "", "b"]}).stop == ["a", "b"]
    assert SamplingParams.from_dict({"stop": ""}).stop == []
    assert SamplingParams.from_dict({"stop": []}).stop == []
    assert SamplingParams().stop is None


def test_build_pads_with_neutral_greedy_rows():
    rows = [(SamplingParams(temperature=0.5, top_k=-1), 2**33 + 5, 3, [2, 9]), (SamplingParams(top_k=1), 1, 0, [])]
    b = SamplingBatch.build(rows, pad_to=4, max_stop_ids=3)
    np.testing.assert_array_equal(b.temperature, [0.5, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(b.top_k, [0, 1, 0, 0])
    np.testing.assert_array_equal(b.repetition_penalty, [1, 1, 1, 1])
    np.testing.assert_array_equal(b.stop_ids, [[2, 9, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]])
    assert b.num_generated[0] == 3 and b.seeds.dtype == np.uint32 and b.seeds[0] != b.seeds[1]
    with pytest.raises(ValueError, match="max_stop_ids"):
        SamplingBatch.build([(SamplingParams(), 0, 0, [1, 2, 3, 4])], pad_to=1, max_stop_ids=3)
    with pytest.raises(ValueError, match="pad_to"):
        SamplingBatch.build(rows, pad_to=1, max_stop_ids=3)


# ----------------------------------------------------------------------------- device


def make_batch(num_rows: int, num_stop: int = 1, **fields) -> SamplingBatch:
    """Neutral greedy batch with some fields overridden (scalars broadcast)."""
    defaults = dict(
        temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, frequency_penalty=0.0, presence_penalty=0.0,
        repetition_penalty=1.0, min_new_tokens=0, num_generated=0, seeds=0,
    )  # fmt: skip
    stop_ids = fields.pop("stop_ids", np.full((num_rows, num_stop), -1, np.int32))
    defaults.update(fields)
    arrays = {}
    for name, value in defaults.items():
        dtype = np.uint32 if name == "seeds" else np.int32 if name in ("top_k", "min_new_tokens", "num_generated") else np.float32
        arrays[name] = np.broadcast_to(np.asarray(value, dtype), (num_rows,)).copy()
    arrays["stop_ids"] = np.asarray(stop_ids, np.int32)
    return SamplingBatch(**arrays)


def run(logits, batch, counts=None, prompt_mask=None, bias=None, allowed=None, k=0) -> SampleOutput:
    logits = np.asarray(logits, np.float32)
    counts = np.zeros(logits.shape, np.int32) if counts is None else counts
    prompt_mask = np.zeros(logits.shape, bool) if prompt_mask is None else prompt_mask
    bias = np.zeros(logits.shape, np.float32) if bias is None else bias
    adjusted = adjust_jit(logits, batch, counts, prompt_mask, bias)
    return sample_jit(logits, batch, adjusted, allowed, top_logprobs_num=k)


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_penalties(logits, counts, prompt_mask, rp, fp, pp):
    out = logits.astype(np.float64).copy()
    for b in range(out.shape[0]):
        for v in range(out.shape[1]):
            if prompt_mask[b, v] or counts[b, v] > 0:
                out[b, v] = out[b, v] / rp[b] if out[b, v] > 0 else out[b, v] * rp[b]
            out[b, v] -= fp[b] * counts[b, v] + pp[b] * (counts[b, v] > 0)
    return out


def np_filter(p, top_k, top_p, min_p):
    """Sequential top-k -> renormalise -> top-p -> min-p -> renormalise, for one row."""
    order = np.argsort(-p, kind="stable")
    q = p[order].astype(np.float64)
    if top_k > 0:
        q[top_k:] = 0
    q /= q.sum()
    q[(np.cumsum(q) - q) >= top_p] = 0
    q[q < min_p * q.max()] = 0
    out = np.zeros_like(q)
    out[order] = q
    return out / out.sum()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_greedy_argmax_and_raw_logprobs(rng):
    logits = rng.normal(size=(5, 300)).astype(np.float32) * 3
    out = run(logits, make_batch(5), k=4)
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1))
    ref = np_log_softmax(logits)
    np.testing.assert_allclose(out.logprobs, ref[np.arange(5), logits.argmax(-1)], atol=1e-5)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-logits, -1)[:, :4])
    np.testing.assert_allclose(out.top_logprobs, np.sort(ref, -1)[:, ::-1][:, :4], atol=1e-5)
    assert run(logits, make_batch(5)).top_ids.shape == (5, 0)


def test_logprobs_are_raw_despite_processing(rng):
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    bias = np.zeros_like(logits)
    bias[:, 7] = 100.0
    batch = make_batch(3, temperature=[0.0, 0.5, 2.0], seeds=[1, 2, 3], repetition_penalty=1.3)
    out = run(logits, batch, prompt_mask=rng.random(logits.shape) < 0.3, bias=bias)
    np.testing.assert_array_equal(out.tokens, [7, 7, 7])
    np.testing.assert_allclose(out.logprobs, np_log_softmax(logits)[:, 7], atol=1e-5)


def test_penalties_match_reference(rng):
    rows, vocab = 4, 64
    logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 2
    counts = rng.integers(0, 4, size=(rows, vocab)).astype(np.int32) * (rng.random((rows, vocab)) < 0.3)
    prompt_mask = rng.random((rows, vocab)) < 0.2
    rp = np.array([1.0, 1.5, 0.7, 2.0], np.float32)
    fp = np.array([0.0, 0.5, -0.3, 1.2], np.float32)
    pp = np.array([0.0, 0.4, 1.0, -0.8], np.float32)
    ref = np_penalties(logits, counts, prompt_mask, rp, fp, pp)
    got = jax.jit(apply_penalties)(logits, counts, prompt_mask, rp, fp, pp)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    batch = make_batch(rows, repetition_penalty=rp, frequency_penalty=fp, presence_penalty=pp)
    out = run(logits, batch, counts=counts, prompt_mask=prompt_mask)
    np.testing.assert_array_equal(out.tokens, ref.argmax(-1))


def test_filter_probs_matches_reference(rng):
    configs = [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.3), (10, 0.8, 0.05), (1, 0.5, 0.0),
               (3, 0.01, 0.0), (200, 0.95, 0.0), (0, 1.0, 1.0)]  # fmt: skip
    logits = rng.normal(size=(len(configs), 100)) * 2
    probs = np.exp(np_log_softmax(logits)).astype(np.float32)
    top_k, top_p, min_p = (np.array(c) for c in zip(*configs))
    got = jax.jit(filter_probs)(probs, top_k.astype(np.int32), top_p.astype(np.float32), min_p.astype(np.float32))
    for i, (k, p, m) in enumerate(configs):
        np.testing.assert_allclose(got[i], np_filter(probs[i], k, p, m), atol=1e-6, err_msg=str(configs[i]))


@pytest.mark.parametrize("vary", ["seeds", "num_generated"])
def test_sampled_frequencies_match_filtered_distribution(vary):
    logits = np.array([2.0, 1.5, 1.2, 1.0, 0.5, 0.3, 0.0, -0.5, -1.0, -2.0], np.float32)
    configs = [(0, 1.0, 0.0), (4, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2), (6, 0.9, 0.1)]
    draws, temperature = 4000, 0.7
    n = len(configs) * draws
    top_k, top_p, min_p = (np.repeat(np.array(c), draws) for c in zip(*configs))
    index = np.tile(np.arange(draws), len(configs)) + np.repeat(np.arange(len(configs)) * draws, draws)
    fields = {"seeds": index, "num_generated": 0} if vary == "seeds" else {"seeds": 1234, "num_generated": index}
    batch = make_batch(n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, **fields)
    tokens = np.asarray(run(np.broadcast_to(logits, (n, len(logits))), batch).tokens).reshape(len(configs), draws)
    probs = np.exp(np_log_softmax(logits / temperature))
    for config, row in zip(configs, tokens):
        expected = np_filter(probs, *config) * draws
        observed = np.bincount(row, minlength=len(logits))
        assert observed[expected == 0].sum() == 0, f"{config}: sampled a filtered-out token"
        kept = expected > 0
        chi2 = float(((observed[kept] - expected[kept]) ** 2 / expected[kept]).sum())
        dof = max(int(kept.sum()) - 1, 1)
        # ~p < 1e-4 for dof <= 9; the draws are deterministic, so this is not flaky.
        assert chi2 < dof + 6 * math.sqrt(2 * dof) + 8, f"{config}: chi2={chi2:.1f} dof={dof}"


def test_min_new_tokens_blocks_stop_ids(rng):
    vocab = 40
    logits = rng.normal(size=(4, vocab)).astype(np.float32)
    logits[:, 3] = 50.0  # eos
    logits[:, vocab - 1] = 40.0  # padding -1 must not block the last token
    stop_ids = np.array([[3, -1], [3, -1], [3, 11], [-1, -1]], np.int32)
    batch = make_batch(4, min_new_tokens=[2, 2, 0, 5], num_generated=[1, 2, 0, 0], stop_ids=stop_ids)
    out = run(logits, batch)
    np.testing.assert_array_equal(out.tokens, [vocab - 1, 3, 3, 3])
    # Sampling rows are blocked too.
    sampling = make_batch(4, temperature=1.0, seeds=[0, 1, 2, 3], min_new_tokens=5, stop_ids=np.tile([[3, vocab - 1]], (4, 1)))
    assert not np.isin(run(logits, sampling).tokens, [3, vocab - 1]).any()


def pack_bitmask(allowed: np.ndarray) -> np.ndarray:
    rows, vocab = allowed.shape
    padded = np.zeros((rows, -(-vocab // 32) * 32), bool)
    padded[:, :vocab] = allowed
    weights = (1 << np.arange(32, dtype=np.uint64)).astype(np.uint64)
    return (padded.reshape(rows, -1, 32) * weights).sum(-1).astype(np.uint32)


def test_allowed_mask_restricts_choices(rng):
    vocab = 70  # not a multiple of 32
    allowed = rng.random((64, vocab)) < 0.1
    allowed[:, 69] = True
    logits = rng.normal(size=(64, vocab)).astype(np.float32)
    mask = pack_bitmask(allowed)
    greedy = run(logits, make_batch(64), allowed=mask)
    np.testing.assert_array_equal(greedy.tokens, np.where(allowed, logits, -np.inf).argmax(-1))
    drawn = run(logits, make_batch(64, temperature=1.5, seeds=np.arange(64)), allowed=mask)
    assert allowed[np.arange(64), np.asarray(drawn.tokens)].all()


def test_seeded_draws_do_not_depend_on_batch(rng):
    rows, vocab = 20, 1000
    logits = np.broadcast_to(rng.normal(size=(vocab,)).astype(np.float32) * 0.1, (rows, vocab))  # near uniform
    seeds, num_generated = np.arange(rows) + 100, np.arange(rows) % 4
    tokens = np.asarray(run(logits, make_batch(rows, temperature=1.0, top_p=0.9, seeds=seeds, num_generated=num_generated)).tokens)
    assert len(set(tokens.tolist())) > 15, "different seeds should draw different tokens"
    # The same rows in reverse order, every other one replaced by an unrelated request.
    other = np.arange(rows) % 2 == 0
    shuffled = make_batch(
        rows, temperature=np.where(other, 0.5, 1.0), top_p=0.9, top_k=np.where(other, 3, 0),
        seeds=np.where(other, 7, seeds[::-1]), num_generated=np.where(other, 9, num_generated[::-1]),
    )  # fmt: skip
    again = np.asarray(run(logits, shuffled).tokens)[::-1]
    np.testing.assert_array_equal(again[~other[::-1]], tokens[~other[::-1]])


def test_update_output_counts():
    counts = jnp.zeros((4, 10), jnp.int32)
    counts = jax.jit(update_output_counts)(counts, jnp.array([1, 2, 1, 0]), jnp.array([5, 5, 5, 9]))
    expected = np.zeros((4, 10), np.int32)
    expected[1, 5], expected[2, 5], expected[0, 9] = 2, 1, 1
    np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize("vocab", [1000, 1024, 49152])
def test_first_argmax_equals_numpy_argmax(vocab):
    """The two-level argmax picks the first column of the row maximum, as np.argmax does:
    random rows, rows with ties (coarse values), rows with -inf, and a vocab that is not a
    multiple of the block."""
    from jaxserve.sampling.sampler import first_argmax

    rng = np.random.default_rng()
    rows = np.concatenate([
        rng.standard_normal((6, vocab)),
        rng.integers(0, 3, (6, vocab)).astype(np.float64),  # many ties at the maximum
        np.where(rng.random((4, vocab)) < 0.9, -np.inf, rng.standard_normal((4, vocab))),
    ]).astype(np.float32)
    rows[-1] = -np.inf  # every token masked: index 0, like np.argmax
    np.testing.assert_array_equal(np.asarray(jax.jit(first_argmax)(rows)), np.argmax(rows, axis=-1))
