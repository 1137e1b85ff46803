"""Structured outputs end to end on the bundled SmolLM2-135M-Instruct.

Every output is checked against an independent reference: `jsonschema` (with its format
checker, so `date`, `email`, `ipv4` and `uuid` are checked), Python's `re` (and the `regex`
module's partial matching for outputs a stop string cut), and `lark` for the EBNF
grammars; the first token of greedy regex and choice outputs is checked against the
model's own logits masked by an allowed set computed from the vocabulary. To stay cheap on
a CPU, one module-scoped engine runs almost every request of the file in two batched
`generate` calls (greedy, then sampled): each JSON schema, regex, grammar and choice list
greedy and with three sampling seeds, an `n > 1` request, stop strings and length cuts.
The same engine with jump-forward off reruns three greedy schemas. The cases are in
`tests/constrained_cases.py`.
"""

import json
import re

import jsonschema
import lark
import numpy as np
import pytest
import regex as regex_module

from jaxserve.errors import InvalidRequestError
from jaxserve.models.batch import ForwardBatch
from tests.constrained_cases import (LONG_KEYS, ARITH_LARK, CHOICES, CUT_LENGTH, CUT_STOP, GRAMMARS, N_BRANCHES,
                                     REGEXES, SCHEMAS, SQL_LARK, STOP_CASES)

SEEDS = (1, 2, 3)
SAMPLED = [{"temperature": 1.0, "sampling_seed": s} for s in SEEDS]
GREEDY = {"temperature": 0}
VARIANTS = [("greedy", GREEDY)] + [(f"seed{s}", p) for s, p in zip(SEEDS, SAMPLED)]
FORMATS = jsonschema.FormatChecker()


def chat(engine, text):
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def build_requests(engine):
    """Every (key, prompt, params) of the batches: key is (kind, name, variant)."""
    requests = []
    for name, text, schema in SCHEMAS:
        prompt = chat(engine, text + " Answer with JSON only.")
        for variant, params in VARIANTS:
            # Alternate the two accepted forms of json_schema: a JSON string and a dict.
            value = json.dumps(schema) if variant in ("greedy", "seed2") else schema
            requests.append((("json", name, variant), prompt, {**params, "max_new_tokens": 160, "json_schema": value}))
    for name, text, pattern in REGEXES:
        for variant, params in VARIANTS:
            requests.append((("regex", name, variant), chat(engine, text),
                             {**params, "max_new_tokens": 64, "regex": pattern}))
    for name, text, gbnf, _ in GRAMMARS:
        for variant, params in VARIANTS:
            requests.append((("ebnf", name, variant), chat(engine, text),
                             {**params, "max_new_tokens": 96, "ebnf": gbnf}))
    for name, text, choices in CHOICES:
        for variant, params in VARIANTS:
            requests.append((("choice", name, variant), chat(engine, text),
                             {**params, "max_new_tokens": 32, "choice": choices}))
    for name, text, pattern, stop, _ in STOP_CASES:
        for variant, params in VARIANTS[:2]:
            requests.append((("stop", name, variant), chat(engine, text),
                             {**params, "max_new_tokens": 64, "regex": pattern, "stop": stop}))
    # Greedy long_keys cut by max_new_tokens, and by a stop string inside a forced key.
    long_keys = chat(engine, SCHEMAS[-1][1] + " Answer with JSON only.")
    cut = {**GREEDY, "json_schema": LONG_KEYS}
    requests.append((("cut", "length", "greedy"), long_keys, {**cut, "max_new_tokens": CUT_LENGTH}))
    requests.append((("cut", "stop", "greedy"), long_keys, {**cut, "max_new_tokens": 160, "stop": CUT_STOP}))
    return requests


@pytest.fixture(scope="module")
def engine(smollm2_engine):
    return smollm2_engine  # shared by the modules on the real model (conftest.py)


@pytest.fixture(scope="module")
def results(engine):
    """Two batched generate calls: {key: result} (the n > 1 request: key -> its branches).
    The greedy requests go first: the sampled ones, on the same prompts, then find them in
    the radix cache and skip most of their prefill (on a CPU most of the cost)."""
    requests = build_requests(engine)
    greedy = [r for r in requests if r[0][2] == "greedy"]
    sampled = [r for r in requests if r[0][2] != "greedy"]
    by_key = {}
    outputs = engine.generate([p for _, p, _ in greedy], [s for _, _, s in greedy])
    assert len(outputs) == len(greedy)
    by_key.update((key, out) for (key, _, _), out in zip(greedy, outputs))
    n_prompt = chat(engine, SCHEMAS[1][1] + " Answer with JSON only.")
    n_params = {"temperature": 1.0, "sampling_seed": 7, "n": N_BRANCHES, "max_new_tokens": 160,
                "json_schema": SCHEMAS[1][2]}
    outputs = engine.generate([p for _, p, _ in sampled] + [n_prompt], [s for _, _, s in sampled] + [n_params])
    assert len(outputs) == len(sampled) + N_BRANCHES
    by_key.update((key, out) for (key, _, _), out in zip(sampled, outputs))
    by_key[("n", "product", "branches")] = outputs[len(sampled):]
    return by_key


def _report(failures):
    assert not failures, "\n".join(failures)


def _finished_by_grammar_or_eos(engine, out):
    """The request stopped because its grammar completed (matched None) or on EOS."""
    reason = out["meta_info"]["finish_reason"]
    return reason["type"] == "stop" and (reason["matched"] is None or reason["matched"] in engine.tokenizer.eos_token_ids)


def _compact(text):
    """The compact JSON layout: outside strings, one space after each `:` and `,` and no
    other whitespace."""
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    return re.search(r"[:,](?! )", rest) is None and not re.search(r"\s", rest.replace(": ", ":").replace(", ", ","))


def test_compact_layout_reference():
    assert _compact('{"a": 1, "b": [2, 3], "c": "x,y:  z"}')
    assert not _compact('{"a":1}') and not _compact('{"a": 1,"b": 2}') and not _compact('{"a":  1}')
    assert not _compact('{\n"a": 1}') and not _compact('[1, 2 ]')


def test_date_format_is_really_checked():
    """The reference must reject what the schema forbids: jsonschema 4.26 checks `date`
    (with datetime.date.fromisoformat) without optional dependencies."""
    schema = {"type": "string", "format": "date"}
    jsonschema.validate("2024-02-29", schema, format_checker=FORMATS)
    for bad in ("2024-02-30", "2023-02-29", "2024-1-5", "20240105", "yesterday"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema, format_checker=FORMATS)
    for fmt, bad in (("email", "no-at-sign"), ("ipv4", "256.1.1.1"), ("uuid", "1234")):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, {"type": "string", "format": fmt}, format_checker=FORMATS)


def test_json_schemas_greedy_and_sampled(engine, results):
    failures = []
    for name, _, schema in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(schema)
        for variant, _ in VARIANTS:
            out = results[("json", name, variant)]
            text, meta = out["text"], out["meta_info"]
            if not _finished_by_grammar_or_eos(engine, out):
                failures.append(f"{name}/{variant}: finish_reason {meta['finish_reason']}: {text!r}")
                continue
            try:
                jsonschema.validate(json.loads(text), schema, format_checker=FORMATS)
            except (ValueError, jsonschema.ValidationError) as e:
                failures.append(f"{name}/{variant}: {type(e).__name__}: {str(e).splitlines()[0]}: {text!r}")
                continue
            if not _compact(text):
                failures.append(f"{name}/{variant}: not in the compact layout: {text!r}")
            if meta["completion_tokens"] > 160:
                failures.append(f"{name}/{variant}: {meta['completion_tokens']} tokens > max_new_tokens")
    _report(failures)


def test_sampling_seeds_give_different_valid_outputs(results):
    """Sampling is really on: across the schemas, the three seeds do not all agree."""
    differing = sum(len({results[("json", name, v)]["text"] for v, _ in VARIANTS[1:]}) > 1 for name, _, _ in SCHEMAS)
    assert differing >= len(SCHEMAS) // 2, differing


def test_regexes_greedy_and_sampled(engine, results):
    failures = []
    for name, _, pattern in REGEXES:
        for variant, _ in VARIANTS:
            out = results[("regex", name, variant)]
            if not _finished_by_grammar_or_eos(engine, out):
                failures.append(f"{name}/{variant}: finish_reason {out['meta_info']['finish_reason']}: {out['text']!r}")
            elif re.fullmatch(pattern, out["text"]) is None:
                failures.append(f"{name}/{variant}: {out['text']!r} does not match {pattern!r}")
    _report(failures)


def test_multiline_regex_output_has_both_lines(results):
    for variant, _ in VARIANTS:
        lines = results[("regex", "name_age", variant)]["text"].split("\n")
        assert len(lines) == 2 and lines[0].startswith("Name: ") and lines[1].startswith("Age: "), lines


def test_ebnf_grammars_parse_with_lark(engine, results):
    failures = []
    for name, _, _, lark_grammar in GRAMMARS:
        parser = lark.Lark(lark_grammar, start="start", parser="earley", lexer="dynamic")
        for variant, _ in VARIANTS:
            out = results[("ebnf", name, variant)]
            if out["meta_info"]["finish_reason"]["type"] != "stop":
                failures.append(f"{name}/{variant}: finish_reason {out['meta_info']['finish_reason']}: {out['text']!r}")
                continue
            try:
                parser.parse(out["text"])
            except lark.exceptions.LarkError as e:
                failures.append(f"{name}/{variant}: lark rejects {out['text']!r}: {str(e).splitlines()[0]}")
    _report(failures)


def test_lark_references_reject_what_the_grammars_forbid():
    arith = lark.Lark(ARITH_LARK, start="start", parser="earley", lexer="dynamic")
    sql = lark.Lark(SQL_LARK, start="start", parser="earley", lexer="dynamic")
    arith.parse("(12-3)/4+1")
    sql.parse("SELECT name, age FROM users WHERE city = 'Paris'")
    for bad_arith in ("01", "1+2+3+4+5", "1 + 2", "(1"):
        with pytest.raises(lark.exceptions.LarkError):
            arith.parse(bad_arith)
    for bad_sql in ("SELECT FROM users WHERE id = 1", "SELECT name FROM people WHERE id = 1",
                    "SELECT name FROM users WHERE id = 12345"):
        with pytest.raises(lark.exceptions.LarkError):
            sql.parse(bad_sql)


def test_choices_are_exact(engine, results):
    failures = []
    for name, _, choices in CHOICES:
        for variant, _ in VARIANTS:
            out = results[("choice", name, variant)]
            if not _finished_by_grammar_or_eos(engine, out):
                failures.append(f"{name}/{variant}: finish_reason {out['meta_info']['finish_reason']}: {out['text']!r}")
            elif out["text"] not in choices:
                failures.append(f"{name}/{variant}: {out['text']!r} is not one of {choices}")
    _report(failures)


def _last_logits(engine, prompts):
    """The model's float32 logits after each prompt: one ragged forward, outside the engine."""
    model = engine.model
    seqs, page = [], 1
    for prompt in prompts:
        ids = engine.tokenizer.encode(prompt)
        n_pages = -(-len(ids) // model.page_size)
        seqs.append((ids, 0, list(range(page, page + n_pages))))
        page += n_pages
    k, v = model.new_kv_cache(page)
    logits, _, _ = model.forward(ForwardBatch.build(seqs, model.page_size), k, v)
    ends = np.cumsum([len(ids) for ids, _, _ in seqs]) - 1
    return np.asarray(logits, np.float32)[ends]


def test_first_constrained_token_is_the_masked_argmax(engine, results):
    """Greedy, the first output token (always sampled, never forced) is the model's best
    token among those whose text can start a match: the allowed set computed here from the
    vocabulary with the `regex` module's partial matching, independently of llguidance."""
    rust = engine.tokenizer.rust
    specials = set(rust.get_added_tokens_decoder())
    pieces = rust.decode_batch([[i] for i in range(rust.get_vocab_size())])
    cases = [(("regex", name, "greedy"), text, pattern) for name, text, pattern in REGEXES]
    cases += [(("choice", name, "greedy"), text, "|".join(re.escape(c) for c in choices))
              for name, text, choices in CHOICES]
    logits = _last_logits(engine, [chat(engine, text) for _, text, _ in cases])
    failures = []
    for (key, _, pattern), row in zip(cases, logits):
        compiled = regex_module.compile(pattern)
        allowed = np.zeros(row.shape[0], bool)
        for i, piece in enumerate(pieces):
            if piece and i not in specials and "\ufffd" not in piece:
                allowed[i] = compiled.fullmatch(piece, partial=True) is not None
        best = int(np.argmax(np.where(allowed, row, -np.inf)))
        first = results[key]["output_ids"][0]
        # Near-ties may flip between the engine's batched forward and this one.
        if first != best and not (allowed[first] and row[first] >= row[best] - 1e-3 * abs(row[best]) - 1e-3):
            failures.append(f"{key}: first token {first} {pieces[first]!r} (logit {row[first]:.4f}, allowed "
                            f"{bool(allowed[first])}); masked argmax {best} {pieces[best]!r} ({row[best]:.4f})")
    _report(failures)


def test_n_branches_are_each_valid(engine, results):
    branches = results[("n", "product", "branches")]
    schema = SCHEMAS[1][2]
    assert len(branches) == N_BRANCHES
    for out in branches:
        assert _finished_by_grammar_or_eos(engine, out), out
        jsonschema.validate(json.loads(out["text"]), schema, format_checker=FORMATS)
    assert len({out["text"] for out in branches}) > 1, [out["text"] for out in branches]


def test_stop_strings_with_a_regex(engine, results):
    for name, _, pattern, stop, before in STOP_CASES:
        for variant, _ in VARIANTS[:2]:
            out = results[("stop", name, variant)]
            text, reason = out["text"], out["meta_info"]["finish_reason"]
            assert stop not in text, (name, variant, text)
            # Whatever was kept is a prefix of some full match of the grammar.
            assert regex_module.fullmatch(pattern, text, partial=True) is not None, (name, variant, text)
            if before is not None:  # the grammar forces the stop string: it ends the request
                assert reason == {"type": "stop", "matched": stop}, (name, variant, reason, text)
                assert re.fullmatch(before, text), (name, variant, text)
                assert re.fullmatch(pattern, text) is None  # cut: not a complete match
                # The same request without the stop string continues past it.
                full = results[("regex", "name_age" if stop == "\n" else "ipv4", variant)]["text"]
                assert full.startswith(text + stop), (name, variant, text, full)
            else:
                assert _finished_by_grammar_or_eos(engine, out), (name, variant, reason, text)
                assert re.fullmatch(pattern, text), (name, variant, text)


def test_outputs_cut_by_length_or_stop_inside_a_forced_run(results):
    """A grammar's forced tokens respect max_new_tokens and stop strings: the cut output is
    a prefix of the uncut one."""
    full = results[("json", "long_keys", "greedy")]["text"]
    assert CUT_STOP in full
    out = results[("cut", "length", "greedy")]
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": CUT_LENGTH}, out["meta_info"]
    assert out["meta_info"]["completion_tokens"] == len(out["output_ids"]) == CUT_LENGTH
    assert full.startswith(out["text"]) and len(out["text"]) < len(full), (out["text"], full)
    out = results[("cut", "stop", "greedy")]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": CUT_STOP}, out["meta_info"]
    assert out["text"] == full[:full.index(CUT_STOP)], (out["text"], full)
    assert out["meta_info"]["completion_tokens"] == len(out["output_ids"])


def test_forced_tokens_count_only_output_tokens(results):
    """`forced_tokens` counts output tokens appended by jump-forward. The first output
    token is always sampled, so it is below `completion_tokens`; where a stop string cuts
    a forced run, the forced tokens past the cut are not output and must not count."""
    failures = []
    for key, out in results.items():
        for branch in out if isinstance(out, list) else [out]:
            meta = branch["meta_info"]
            if not 0 <= meta["forced_tokens"] < meta["completion_tokens"]:
                failures.append(f"{key}: forced_tokens {meta['forced_tokens']} of {meta['completion_tokens']} "
                                f"output tokens {branch['output_ids']}: {branch['text']!r} {meta['finish_reason']}")
    # The stop-cut long_keys output is a token prefix of the length-cut one, so (same greedy
    # path, same forced runs) it cannot hold more forced tokens.
    by_stop, by_length = results[("cut", "stop", "greedy")], results[("cut", "length", "greedy")]
    assert by_length["output_ids"][:len(by_stop["output_ids"])] == by_stop["output_ids"]
    if by_stop["meta_info"]["forced_tokens"] > by_length["meta_info"]["forced_tokens"]:
        failures.append(f"cut by stop {CUT_STOP!r}: forced_tokens {by_stop['meta_info']['forced_tokens']} of "
                        f"{len(by_stop['output_ids'])} output tokens, but the first {len(by_length['output_ids'])} "
                        f"tokens of the same output hold only {by_length['meta_info']['forced_tokens']}")
    _report(failures)


def test_invalid_grammars_are_rejected_up_front(engine):
    for params in ({"regex": "("}, {"json_schema": "{not json"}, {"ebnf": "root ::= (("},
                   {"choice": []}, {"regex": "a", "choice": ["a"]}, {"json_schema": 3}):
        with pytest.raises(InvalidRequestError):
            engine.generate("x", {"max_new_tokens": 4, **params})
    # The engine is still serving.
    assert engine.generate(chat(engine, "Is water wet?"), {"temperature": 0, "max_new_tokens": 8,
                                                          "regex": "(yes|no)"})["text"] in ("yes", "no")


JUMP_FORWARD_SCHEMAS = ["long_keys", "book", "status_union"]


def test_jump_forward_forces_tokens_and_changes_nothing(engine, results):
    """With jump-forward on the long fixed keys are appended without sampling
    (forced_tokens > 0); with it off (`--disable-jump-forward`, read as each request is
    submitted) every token is sampled (forced_tokens == 0) and, greedy, the outputs are
    exactly the same."""
    assert results[("json", "long_keys", "greedy")]["meta_info"]["forced_tokens"] > 10
    engine.args.disable_jump_forward = True
    try:
        schemas = {name: (text, schema) for name, text, schema in SCHEMAS}
        prompts = [chat(engine, schemas[n][0] + " Answer with JSON only.") for n in JUMP_FORWARD_SCHEMAS]
        params = [{**GREEDY, "max_new_tokens": 160, "json_schema": schemas[n][1]} for n in JUMP_FORWARD_SCHEMAS]
        outputs = engine.generate(prompts, params)
    finally:
        engine.args.disable_jump_forward = False
    for name, out in zip(JUMP_FORWARD_SCHEMAS, outputs):
        on = results[("json", name, "greedy")]
        assert out["meta_info"]["forced_tokens"] == 0, (name, out["meta_info"])
        assert on["meta_info"]["forced_tokens"] > 0, (name, on["meta_info"])
        assert out["text"] == on["text"], (name, out["text"], on["text"])
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
