"""Per-request ``SamplingParams``: the host side of sampling.

``SamplingParams`` carries SGLang's field names and defaults; ``from_dict`` checks types
and ``validate`` checks ranges, both raising :class:`InvalidRequestError` with a message
naming the field, so bad input is refused at the edge and never reaches the device.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

from jaxserve.errors import InvalidRequestError

__all__ = ["SamplingParams"]

# Below this a temperature is treated as greedy (SGLang does the same), which also keeps
# logits / temperature finite.
_GREEDY_EPS = 1e-6
_MAX_N = 128
_F32_MAX = 3.4e38
# The ranges `SamplingParams.validate` checks, as JSON Schema says them (max_new_tokens has
# a per-server limit on top, and min_new_tokens may not pass it).
_RANGES = {"max_new_tokens": {"minimum": 0}, "min_new_tokens": {"minimum": 0}, "n": {"minimum": 1, "maximum": _MAX_N},
           "temperature": {"minimum": 0}, "top_p": {"exclusiveMinimum": 0, "maximum": 1}, "top_k": {"minimum": -1},
           "min_p": {"minimum": 0, "maximum": 1}, "frequency_penalty": {"minimum": -2, "maximum": 2},
           "presence_penalty": {"minimum": -2, "maximum": 2}, "repetition_penalty": {"exclusiveMinimum": 0},
           "sampling_seed": {"minimum": 0}}


def _type_name(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bool is an int subclass


def _str_list(name: str, value: Any, *, drop_empty: bool) -> list[str] | None:
    """Normalise ``str | list[str] | None`` to a list (``None`` stays ``None``)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise InvalidRequestError(f"sampling_params.{name} must be a string or a list of strings, got {_type_name(value)}")
    return [s for s in items if s] if drop_empty else list(items)


@dataclasses.dataclass
class SamplingParams:
    """How to decode one request; field names and defaults follow SGLang."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    n: int = 1
    stop: str | list[str] | None = None  # normalised to a list of non-empty strings
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None  # normalised to a list of patterns
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    logit_bias: dict[str | int, float] | None = None  # normalised to int keys
    sampling_seed: int | None = None
    # Constrained decoding (at most one; checked and compiled by jaxserve.constrained):
    regex: str | None = None
    json_schema: str | dict | None = None  # a JSON string, as SGLang takes it, or the schema itself
    ebnf: str | None = None
    choice: list[str] | None = None  # the output is exactly one of these strings

    _INT_FIELDS: ClassVar[tuple[str, ...]] = ("max_new_tokens", "min_new_tokens", "n", "top_k")
    _FLOAT_FIELDS: ClassVar[tuple[str, ...]] = (
        "temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
    )
    _BOOL_FIELDS: ClassVar[tuple[str, ...]] = (
        "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    )
    _OPT_STR_FIELDS: ClassVar[tuple[str, ...]] = ("regex", "ebnf")

    def __post_init__(self) -> None:
        # Type checks live here so direct construction is as safe as from_dict.
        for name in self._INT_FIELDS:
            if not _is_int(getattr(self, name)):
                raise InvalidRequestError(f"sampling_params.{name} must be an integer, got {_type_name(getattr(self, name))}")
        for name in self._FLOAT_FIELDS:
            v = getattr(self, name)
            if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
                raise InvalidRequestError(f"sampling_params.{name} must be a finite number, got {_type_name(v)}")
            setattr(self, name, float(v))
        for name in self._BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"sampling_params.{name} must be a boolean, got {_type_name(getattr(self, name))}")
        for name in self._OPT_STR_FIELDS:
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise InvalidRequestError(f"sampling_params.{name} must be a string, got {_type_name(v)}")
        if self.sampling_seed is not None and not _is_int(self.sampling_seed):
            raise InvalidRequestError(f"sampling_params.sampling_seed must be an integer, got {_type_name(self.sampling_seed)}")
        self.stop = _str_list("stop", self.stop, drop_empty=True)
        self.stop_regex = _str_list("stop_regex", self.stop_regex, drop_empty=True)
        for pattern in self.stop_regex or []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise InvalidRequestError(f"sampling_params.stop_regex {pattern!r} is not a valid regex: {e}") from None
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
                raise InvalidRequestError(f"sampling_params.stop_token_ids must be a list of integers, got {_type_name(ids)}")
        if self.logit_bias is not None:
            self.logit_bias = self._normalise_logit_bias(self.logit_bias)

    @staticmethod
    def _normalise_logit_bias(bias: Any) -> dict[int, float]:
        """OpenAI sends token ids as string keys; accept those and ints."""
        if not isinstance(bias, dict):
            raise InvalidRequestError(f"sampling_params.logit_bias must be an object {{token_id: bias}}, got {_type_name(bias)}")
        out: dict[int, float] = {}
        for key, value in bias.items():
            if _is_int(key):
                token = key
            elif isinstance(key, str) and re.fullmatch(r"-?\d+", key.strip()):
                token = int(key)
            else:
                raise InvalidRequestError(f"sampling_params.logit_bias keys must be token ids, got {_type_name(key)}")
            if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
                raise InvalidRequestError(f"sampling_params.logit_bias[{key!r}] must be a finite number, got {_type_name(value)}")
            out[token] = float(value)
        return out

    @classmethod
    def schema(cls) -> dict:
        """The JSON Schema of a `sampling_params` object (what `/openapi.json` shows): the types
        `__post_init__` checks and the ranges `validate` checks."""
        strings = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
        props: dict[str, dict] = {name: {"type": "integer"} for name in cls._INT_FIELDS}
        props |= {name: {"type": "number"} for name in cls._FLOAT_FIELDS}
        props |= {name: {"type": "boolean"} for name in cls._BOOL_FIELDS}
        props |= {name: {"type": "string"} for name in cls._OPT_STR_FIELDS}
        props |= {"stop": strings, "stop_regex": strings, "sampling_seed": {"type": "integer"},
                  "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                  "logit_bias": {"type": "object", "additionalProperties": {"type": "number"}},
                  "json_schema": {"oneOf": [{"type": "string"}, {"type": "object"}]},
                  "choice": {"type": "array", "items": {"type": "string"}}}
        for name, bounds in _RANGES.items():
            props[name] = {**props[name], **bounds}
        assert set(props) == {f.name for f in dataclasses.fields(cls)}, "a field without a schema"
        return {"type": "object", "properties": props, "additionalProperties": False}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from a request's ``sampling_params`` object; ``None`` values mean default."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise InvalidRequestError(f"sampling_params must be an object, got {_type_name(d)}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in d if k not in valid)
        if unknown:
            raise InvalidRequestError(f"unknown sampling_params field(s) {unknown}; valid fields are: {', '.join(valid)}")
        return cls(**{k: v for k, v in d.items() if v is not None})

    def validate(self, vocab_size: int, max_new_tokens_limit: int | None = None) -> None:
        """Check value ranges; raise :class:`InvalidRequestError` naming the first bad field."""

        def bad(name: str, rule: str) -> InvalidRequestError:
            return InvalidRequestError(f"sampling_params.{name} must be {rule}, got {getattr(self, name)!r}")

        if self.max_new_tokens < 0:
            raise bad("max_new_tokens", ">= 0")
        if max_new_tokens_limit is not None and self.max_new_tokens > max_new_tokens_limit:
            raise bad("max_new_tokens", f"<= {max_new_tokens_limit}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise bad("min_new_tokens", f"between 0 and max_new_tokens ({self.max_new_tokens})")
        if not 1 <= self.n <= _MAX_N:
            raise bad("n", f"between 1 and {_MAX_N}")
        if self.temperature < 0:
            raise bad("temperature", ">= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "-1 or 0 (off) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0")
        if any(not 0 <= t < vocab_size for t in self.stop_token_ids or []):
            raise bad("stop_token_ids", f"token ids in [0, {vocab_size})")
        if any(not 0 <= t < vocab_size for t in self.logit_bias or {}):
            raise bad("logit_bias", f"keyed by token ids in [0, {vocab_size})")
        if self.sampling_seed is not None and self.sampling_seed < 0:
            raise bad("sampling_seed", ">= 0")
        for name in self._FLOAT_FIELDS:  # the sampler runs in float32: a larger value would become inf
            if abs(getattr(self, name)) > _F32_MAX:
                raise bad(name, f"at most {_F32_MAX:.1e} in magnitude")
        if any(abs(v) > _F32_MAX for v in (self.logit_bias or {}).values()):
            raise bad("logit_bias", f"biases at most {_F32_MAX:.1e} in magnitude")

    @property
    def is_greedy(self) -> bool:
        """Whether decoding is deterministic argmax (temperature 0 or top_k 1)."""
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view for server info and logs."""
        return dataclasses.asdict(self)
