"""What a request asks its output to match, turned into an llguidance grammar.

A request names at most one of SGLang's constrained fields: `regex`, `json_schema` (a
JSON string or object), `ebnf` (GBNF-style `root ::= ...`, or Lark) and `choice` (a list
of strings: the output is exactly one of them). JSON is compiled with a compact layout,
`{"a": 1, "b": [2, 3]}` with one space after `:` and `,` and no other whitespace, unless
the server sets `--constrained-json-whitespace-pattern`: a model can then not loop on
spaces or newlines until it runs out of tokens.
"""

from __future__ import annotations

import dataclasses
import json

import llguidance

from jaxserve.errors import InvalidRequestError

FIELDS = ("regex", "json_schema", "ebnf", "choice")


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """One request's constraint: the field it came from and its text (the cache key)."""

    field: str  # one of FIELDS
    text: str  # regex / schema JSON / grammar / JSON list of choices

    @property
    def what(self) -> str:
        return f"sampling_params.{self.field}"


def spec_of(params) -> GrammarSpec | None:
    """The constraint `SamplingParams` asks for, or None. Raises if it names several."""
    given = [f for f in FIELDS if getattr(params, f) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequestError(f"give at most one constraint of {', '.join(FIELDS)}; got {' and '.join(given)}")
    field = given[0]
    value = getattr(params, field)
    if field == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"sampling_params.json_schema is not valid JSON: {e}") from None
        if value is True:  # the schema that allows any JSON value
            value = {}
        if not isinstance(value, dict):
            raise InvalidRequestError("sampling_params.json_schema must be a JSON schema object (or its JSON string)"
                                      + ("; `false` allows no output at all" if value is False else ""))
        return GrammarSpec(field, json.dumps(value))
    if field == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidRequestError("sampling_params.choice must be a non-empty list of non-empty strings")
        return GrammarSpec(field, json.dumps(value))
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"sampling_params.{field} must be a non-empty string")
    return GrammarSpec(field, value)


def to_llguidance(spec: GrammarSpec, json_whitespace: str | None = None) -> str:
    """The llguidance grammar for `spec` (not yet checked against a tokenizer)."""
    if spec.field == "json_schema":
        options = ({"whitespace_flexible": True, "whitespace_pattern": json_whitespace} if json_whitespace else
                   {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=options)
        except ValueError as e:
            raise InvalidRequestError(f"{spec.what} is not a usable JSON schema: {e}") from None
    if spec.field == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    if spec.field == "choice":
        lark = "start: " + " | ".join(json.dumps(c) for c in json.loads(spec.text))
        return llguidance.LLMatcher.grammar_from_lark(lark)
    try:
        return llguidance.grammar_from("ebnf", spec.text)
    except ValueError as e:
        raise InvalidRequestError(f"{spec.what} is not a valid grammar: {e}") from None
