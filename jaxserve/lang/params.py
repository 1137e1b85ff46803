"""Sampling parameters of a program: the run's defaults, a `gen`'s overrides, and the
`/generate` body they become."""

from __future__ import annotations

import json
from typing import Any

# SGLang's frontend defaults for `function.run(...)`.
RUN_DEFAULTS: dict[str, Any] = dict(
    max_new_tokens=128, min_new_tokens=0, n=1, stop=[], stop_token_ids=[], stop_regex=[], temperature=1.0,
    top_p=1.0, top_k=-1, min_p=0.0, frequency_penalty=0.0, presence_penalty=0.0, ignore_eos=False,
    return_logprob=None, logprob_start_len=None, top_logprobs_num=None, return_text_in_logprobs=None,
)
SAMPLING_KEYS = ("max_new_tokens", "min_new_tokens", "n", "stop", "stop_token_ids", "stop_regex", "temperature",
                 "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "ignore_eos", "regex",
                 "json_schema")
LOGPROB_KEYS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")

# What `gen(dtype=...)` constrains the output to (a number may end with a space or newline,
# which is a stop string, so it is not part of the text), and how the text becomes a value.
_NUMBER_STOPS = [" ", "\n"]
_TYPES: dict[type, tuple[str, list[str], Any]] = {
    int: (r"[-+]?[0-9]+[ \n]*", _NUMBER_STOPS, int),
    float: (r"[-+]?[0-9]*\.?[0-9]+[ \n]*", _NUMBER_STOPS, float),
    bool: ("(True|False)", [], lambda text: text == "True"),
    str: (r'"[^"\n]*"', [], json.loads),
}
DTYPES = {**_TYPES, **{t.__name__: spec for t, spec in _TYPES.items()}}


def run_defaults(**overrides: Any) -> dict[str, Any]:
    unknown = set(overrides) - set(RUN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown sampling arguments {sorted(unknown)}; known: {sorted(RUN_DEFAULTS)}")
    return {**RUN_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}


def resolve(defaults: dict[str, Any], overrides: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """The run's defaults with a `gen`'s non-None overrides; `dtype` becomes a regex."""
    params = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"gen(dtype={dtype!r}): use int, float, bool or str")
        params["regex"], stops, _ = DTYPES[dtype]
        stop = params.get("stop") or []
        params["stop"] = [*([stop] if isinstance(stop, str) else stop), *stops]
    if isinstance(params.get("json_schema"), dict):
        params["json_schema"] = json.dumps(params["json_schema"])  # SGLang servers take a JSON string
    return params


def generate_body(text: str | list[str], params: dict[str, Any]) -> dict[str, Any]:
    """A `/generate` body for `text` under resolved params."""
    sampling = {k: params[k] for k in SAMPLING_KEYS if params.get(k) is not None}
    body: dict[str, Any] = {"text": text, "sampling_params": sampling}
    body.update({k: params[k] for k in LOGPROB_KEYS if params.get(k) is not None})
    return body


def typed_value(text: str, dtype: Any) -> Any:
    """The value of a typed `gen`: `dtype=int` gives an int, and so on."""
    if dtype is None:
        return text
    return DTYPES[dtype][2](text.strip())
