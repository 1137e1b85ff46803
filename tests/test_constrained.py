"""Constrained decoding in the engine on a tiny random Llama (SmolLM2's tokenizer): random
weights want anything, so every output that matches its regex or schema is the grammar's
doing. Free requests batched with constrained ones produce what they produce alone, with
the overlap loop on and off; jump-forward changes no greedy output; retraction keeps
constrained outputs valid; no step compiles."""

import json
import re

import jsonschema
import numpy as np
import pytest

import jaxserve
from jaxserve.constrained import fill_masks, spec_of
from jaxserve.runner import compile_count
from jaxserve.sampling import SamplingParams

FREE = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
REGEXES = [r"(yes|no)", r"[0-9]{3}-[0-9]{4}", r"#[0-9a-f]{6}", r"(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.[0-9]{1,3}){3}",
           r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", r"[A-Z][a-z]{2,8} [A-Z][a-z]{2,8}", r"Name: [A-Z][a-z]{1,6}\nAge: [0-9]{1,2}",
           r"(red|green|blue)!?"]
SCHEMA = {  # long fixed keys: jump-forward appends most of the output
    "type": "object",
    "properties": {
        "customer_full_name_as_on_record": {"type": "string", "maxLength": 6},
        "shipping_priority_level": {"enum": ["standard", "express", "overnight"]},
        "number_of_items_in_the_order": {"type": "integer", "minimum": 1, "maximum": 99},
        "gift_wrapping_requested": {"type": "boolean"},
    },
    "required": ["customer_full_name_as_on_record", "shipping_priority_level", "number_of_items_in_the_order",
                 "gift_wrapping_requested"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(3, 49152, size=n).tolist() for n in (5, 23, 40, 11, 3, 30, 17, 8)]


def make_engine(tiny_dir, **kw):
    args = dict(max_running_requests=16, max_prefill_tokens=128, chunked_prefill_size=128, context_length=256,
                dtype="float32")
    return jaxserve.Engine(str(tiny_dir), **{**args, **kw})


@pytest.fixture(scope="module", params=[True, False], ids=["overlap", "sync"])
def engine(request, tiny_dir):
    e = make_engine(tiny_dir, disable_overlap_schedule=not request.param)
    e.overlap = request.param
    yield e
    e.shutdown()


def constrained_params(regex):
    return {"temperature": 0, "max_new_tokens": 60, "regex": regex}


def assert_valid(results, regexes):
    for r, rx in zip(results, regexes):
        assert r["meta_info"]["finish_reason"]["type"] == "stop", (rx, r)
        assert re.fullmatch(rx, r["text"]), (rx, r["text"])


def test_free_rows_next_to_constrained_rows_equal_alone(engine, prompts):
    e = engine
    alone = [r["output_ids"] for r in e.generate(input_ids=prompts, sampling_params=FREE)]
    compiles = compile_count()
    mixed = e.generate(input_ids=prompts + prompts,
                       sampling_params=[FREE] * len(prompts) + [constrained_params(rx) for rx in REGEXES])
    assert [r["output_ids"] for r in mixed[: len(prompts)]] == alone
    assert_valid(mixed[len(prompts):], REGEXES)
    assert compile_count() == compiles  # one sample program with or without masks
    # Sampled constrained rows are valid too, and seeded ones reproduce.
    sampled = [{"temperature": 1.0, "max_new_tokens": 60, "regex": rx, "sampling_seed": 7} for rx in REGEXES]
    first = e.generate(input_ids=prompts, sampling_params=sampled)
    assert_valid(first, REGEXES)
    assert [r["text"] for r in e.generate(input_ids=prompts, sampling_params=sampled)] == [r["text"] for r in first]


def test_jump_forward_changes_no_greedy_output(engine, prompts):
    params = {"temperature": 0, "max_new_tokens": 120, "json_schema": json.dumps(SCHEMA)}
    steps = engine.get_server_info()["num_steps"]
    on = engine.generate(input_ids=prompts[:3], sampling_params=params)
    steps_on = engine.get_server_info()["num_steps"] - steps
    engine.args.disable_jump_forward = True  # read as each request is submitted
    try:
        off = engine.generate(input_ids=prompts[:3], sampling_params=params)
        steps_off = engine.get_server_info()["num_steps"] - steps - steps_on
    finally:
        engine.args.disable_jump_forward = False
    for a, b in zip(on, off):
        assert a["output_ids"] == b["output_ids"] and a["text"] == b["text"]
        jsonschema.validate(json.loads(a["text"]), SCHEMA)
        assert a["meta_info"]["forced_tokens"] > len(a["output_ids"]) // 2  # the keys are forced
        assert b["meta_info"]["forced_tokens"] == 0
    assert steps_on < steps_off / 2


def test_retraction_keeps_constrained_outputs(engine, tiny_dir, prompts):
    params = [constrained_params(rx) for rx in REGEXES] + [
        {"temperature": 0, "max_new_tokens": 120, "json_schema": SCHEMA}] * len(REGEXES)
    reference = engine.generate(input_ids=prompts + prompts, sampling_params=params)
    tight = make_engine(tiny_dir, max_total_tokens=256, disable_overlap_schedule=not engine.overlap)
    try:
        results = tight.generate(input_ids=prompts + prompts, sampling_params=params)
        assert tight.get_server_info()["num_retractions"] > 0
    finally:
        tight.shutdown()
    assert [r["output_ids"] for r in results] == [r["output_ids"] for r in reference]
    assert_valid(results[: len(REGEXES)], REGEXES)
    for r in results[len(REGEXES):]:
        jsonschema.validate(json.loads(r["text"]), SCHEMA)


def test_step_mask_matches_llguidance_per_row(engine):
    """The batch filler writes each grammar's mask into its row, all-ones elsewhere."""
    e = engine
    grammars = [e.grammars.get(spec_of(SamplingParams(regex=rx))).start() for rx in REGEXES[:3]]
    mask = fill_masks([(1, grammars[0]), (3, grammars[1]), (4, grammars[2])], 6, e.model.config.vocab_size)
    assert (mask[[0, 2, 5]] == -1).all()
    for row, g in zip((1, 3, 4), grammars):
        alone = np.frombuffer(g.matcher.compute_bitmask(), np.int32)  # may carry a spare trailing word
        assert not alone[mask.shape[1]:].any()
        alone = alone[: mask.shape[1]]
        np.testing.assert_array_equal(mask[row], alone)
    allowed = np.nonzero(np.unpackbits(mask[1].view(np.uint8), bitorder="little"))[0]
    texts = {e.tokenizer.decode([int(t)]) for t in allowed}  # (yes|no): exactly the tokens that start a word
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts), texts
    assert {"y", "n", "yes", "no"} <= texts | {"y", "n"}
    assert e.grammars.get(spec_of(SamplingParams(regex=REGEXES[0]))) is e.grammars.get(
        spec_of(SamplingParams(regex=REGEXES[0])))  # compiled once


def test_bad_grammars_never_reach_the_scheduler(engine):
    e = engine
    steps = e.get_server_info()["num_steps"]
    for params in ({"regex": "("}, {"ebnf": "root ::= ("}, {"json_schema": "{not json"}, {"json_schema": "[1]"},
                   {"choice": []}, {"regex": "a", "choice": ["a"]}, {"ebnf": "root ::= missing"},
                   {"json_schema": False}):
        with pytest.raises(jaxserve.errors.InvalidRequestError, match=next(iter(params))):
            e.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 4, **params})
    assert e.get_server_info()["num_steps"] == steps
    assert e.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 4, "choice": ["ab", "cd"]})[
        "text"] in ("ab", "cd")


def test_grammar_failures_mid_request_end_it_with_a_short_error(engine):
    # A literal that spells a special token: llguidance forces the token, then refuses it.
    out = engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 8, "regex": r"<\|im_end\|>"})
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["message"].startswith("constrained decoding failed")
    assert len(reason["message"]) < 400 and "\n" not in reason["message"]  # not llguidance's state dump
    anything = engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 4, "json_schema": True})
    assert anything["meta_info"]["completion_tokens"] >= 1  # `true`: any JSON value
    assert_nothing_held(engine)


def assert_nothing_held(engine):
    info = engine.get_server_info()
    assert info["num_running_reqs"] == info["num_waiting_reqs"] == info["locked_pages"] == 0
