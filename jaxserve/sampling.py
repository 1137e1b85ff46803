"""Sampling: per-request ``SamplingParams`` (host) and the on-device sampler.

``SamplingParams`` carries SGLang's field names and defaults; ``from_dict`` checks types
and ``validate`` checks ranges, both raising :class:`InvalidRequestError` with a message
naming the field, so bad input is refused at the edge and never reaches the device.

``sample`` runs inside the runner's single jitted step on fixed shapes. Its pipeline
(vLLM/SGLang semantics): penalties -> logit bias -> block stop ids before
``min_new_tokens`` -> grammar bitmask -> greedy argmax, or temperature -> top-k ->
top-p -> min-p -> categorical draw. Logprobs are always of the *raw* logits, which is
what SGLang reports and what the tests compare against transformers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.errors import InvalidRequestError

__all__ = [
    "SampleOutput",
    "SamplingBatch",
    "SamplingParams",
    "apply_penalties",
    "filter_probs",
    "sample",
    "update_output_counts",
]

# Below this a temperature is treated as greedy (SGLang does the same), which also keeps
# logits / temperature finite.
_GREEDY_EPS = 1e-6
_MAX_N = 128


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
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None

    _INT_FIELDS: ClassVar[tuple[str, ...]] = ("max_new_tokens", "min_new_tokens", "n", "top_k")
    _FLOAT_FIELDS: ClassVar[tuple[str, ...]] = (
        "temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
    )
    _BOOL_FIELDS: ClassVar[tuple[str, ...]] = (
        "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    )
    _OPT_STR_FIELDS: ClassVar[tuple[str, ...]] = ("regex", "json_schema", "ebnf")

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
        constrained = [name for name in self._OPT_STR_FIELDS if getattr(self, name) is not None]
        if constrained:
            raise InvalidRequestError(
                f"sampling_params.{constrained[0]}: constrained decoding (regex/json_schema/ebnf) is not supported yet"
            )

    @property
    def is_greedy(self) -> bool:
        """Whether decoding is deterministic argmax (temperature 0 or top_k 1)."""
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view for server info and logs."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- device


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """Per-row sampling arrays of one step; padded rows are greedy with neutral params."""

    temperature: jax.Array  # [B] f32, 0 = greedy
    top_p: jax.Array  # [B] f32
    top_k: jax.Array  # [B] i32, 0 = off
    min_p: jax.Array  # [B] f32
    frequency_penalty: jax.Array  # [B] f32
    presence_penalty: jax.Array  # [B] f32
    repetition_penalty: jax.Array  # [B] f32
    min_new_tokens: jax.Array  # [B] i32
    num_generated: jax.Array  # [B] i32, index of the token being sampled
    stop_ids: jax.Array  # [B, S] i32, padded with -1
    seeds: jax.Array  # [B] u32

    @classmethod
    def build(
        cls,
        rows: list[tuple[SamplingParams, int, int, list[int]]],
        pad_to: int,
        max_stop_ids: int,
    ) -> SamplingBatch:
        """Numpy batch from ``(params, seed, num_generated, stop_ids)`` rows, padded to ``pad_to``."""
        if len(rows) > pad_to:
            raise ValueError(f"{len(rows)} rows do not fit pad_to={pad_to}")
        f32 = lambda fill: np.full(pad_to, fill, np.float32)  # noqa: E731
        i32 = lambda fill: np.full(pad_to, fill, np.int32)  # noqa: E731
        b = cls(
            temperature=f32(0.0), top_p=f32(1.0), top_k=i32(0), min_p=f32(0.0),
            frequency_penalty=f32(0.0), presence_penalty=f32(0.0), repetition_penalty=f32(1.0),
            min_new_tokens=i32(0), num_generated=i32(0),
            stop_ids=np.full((pad_to, max_stop_ids), -1, np.int32),
            seeds=np.zeros(pad_to, np.uint32),
        )  # fmt: skip
        for i, (p, seed, num_generated, stop_ids) in enumerate(rows):
            if len(stop_ids) > max_stop_ids:
                # Truncating would let a dropped stop id through before min_new_tokens.
                raise ValueError(f"row {i} has {len(stop_ids)} stop ids, more than max_stop_ids={max_stop_ids}")
            # Greedy rows get temperature 0 so the all-greedy fast path sees them.
            b.temperature[i] = 0.0 if p.is_greedy else p.temperature
            b.top_p[i], b.top_k[i], b.min_p[i] = p.top_p, max(p.top_k, 0), p.min_p
            b.frequency_penalty[i], b.presence_penalty[i] = p.frequency_penalty, p.presence_penalty
            b.repetition_penalty[i] = p.repetition_penalty
            b.min_new_tokens[i], b.num_generated[i] = p.min_new_tokens, num_generated
            b.stop_ids[i, : len(stop_ids)] = stop_ids
            # Fold a 64-bit seed into 32 bits so large user seeds still differ.
            b.seeds[i] = (seed ^ (seed >> 32)) & 0xFFFFFFFF
        return b


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    """Result of one sampling step."""

    tokens: jax.Array  # [B] i32
    logprobs: jax.Array  # [B] f32, raw log-softmax at the chosen token
    top_ids: jax.Array  # [B, K] i32
    top_logprobs: jax.Array  # [B, K] f32, raw log-softmax


def apply_penalties(
    logits: jax.Array,  # [B, V] f32
    output_counts: jax.Array,  # [B, V] i32
    prompt_mask: jax.Array,  # [B, V] bool
    repetition_penalty: jax.Array,  # [B] f32
    frequency_penalty: jax.Array,  # [B] f32
    presence_penalty: jax.Array,  # [B] f32
) -> jax.Array:
    """Repetition (HF style, over prompt + output), then frequency and presence penalties."""
    in_output = output_counts > 0
    rp = repetition_penalty[:, None]
    penalised = jnp.where(logits > 0, logits / rp, logits * rp)
    logits = jnp.where(prompt_mask | in_output, penalised, logits)
    return (
        logits
        - frequency_penalty[:, None] * output_counts.astype(logits.dtype)
        - presence_penalty[:, None] * in_output.astype(logits.dtype)
    )


def _top_k_top_p_keep(probs: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, V] bool: tokens that survive top-k then top-p (top-p over the top-k mass)."""
    vocab = probs.shape[-1]
    sorted_probs = -jnp.sort(-probs, axis=-1)  # [B, V] descending
    rank = jnp.arange(vocab)[None, :]
    in_k = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    kept = jnp.where(in_k, sorted_probs, 0.0)
    cum = jnp.cumsum(kept, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before
    # it is still short of top_p. Rank 0 always stays (mass before it is 0 < top_p).
    in_p = (cum - kept) < top_p[:, None] * cum[:, -1:]
    num_kept = jnp.sum(in_k & in_p, axis=-1)  # [B] >= 1
    cutoff = jnp.take_along_axis(sorted_probs, (num_kept - 1)[:, None], axis=-1)  # [B, 1]
    # Comparing against the cutoff value avoids scattering the sorted mask back; ties at
    # the cutoff keep all tied tokens, as vLLM does.
    return probs >= cutoff


def _min_p_keep(probs: jax.Array, min_p: jax.Array) -> jax.Array:
    return probs >= min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)


def filter_probs(probs: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Apply top-k, top-p and min-p to ``probs`` [B, V] and renormalise (the sampled distribution)."""
    keep = _top_k_top_p_keep(probs, top_k, top_p) & _min_p_keep(probs, min_p)
    kept = jnp.where(keep, probs, 0.0)
    return kept / jnp.sum(kept, axis=-1, keepdims=True)


def _unpack_bitmask(allowed_mask: jax.Array, vocab: int) -> jax.Array:
    """[B, ceil(V/32)] u32 -> [B, V] bool; token v is bit v % 32 of word v // 32."""
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = (allowed_mask.astype(jnp.uint32)[:, :, None] >> shifts) & 1  # [B, W, 32]
    return bits.reshape(allowed_mask.shape[0], -1)[:, :vocab] != 0


def _draw(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """Temperature + top-k/top-p/min-p + categorical draw for every row -> [B] i32."""
    temperature = jnp.where(batch.temperature > 0, batch.temperature, 1.0)
    scaled = logits / temperature[:, None]  # [B, V]
    probs = jax.nn.softmax(scaled, axis=-1)
    vocab = logits.shape[-1]
    sampling = batch.temperature > 0
    needs_sort = jnp.any(sampling & (((batch.top_k > 0) & (batch.top_k < vocab)) | (batch.top_p < 1.0)))
    # The [B, V] sort is the dearest part of sampling; skip it when no row filters.
    keep = jax.lax.cond(
        needs_sort,
        lambda: _top_k_top_p_keep(probs, batch.top_k, batch.top_p),
        lambda: jnp.ones(probs.shape, bool),
    )
    keep &= _min_p_keep(probs, batch.min_p)
    masked = jnp.where(keep, scaled, -jnp.inf)
    # One key per row from (seed, position): a row's draw does not depend on the batch.
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(batch.seeds, batch.num_generated)
    return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)


def sample(
    logits: jax.Array,  # [B, V] f32 raw model logits
    batch: SamplingBatch,
    output_counts: jax.Array,  # [B, V] i32
    prompt_mask: jax.Array,  # [B, V] bool
    logit_bias: jax.Array,  # [B, V] f32
    allowed_mask: jax.Array | None = None,  # [B, ceil(V/32)] u32, bit set = allowed
    top_logprobs_num: int = 0,  # static
) -> SampleOutput:
    """Pick the next token of every row and report raw-logit logprobs (jittable)."""
    logits = logits.astype(jnp.float32)
    num_rows, vocab = logits.shape
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)  # [B, V]

    any_penalty = jnp.any(
        (batch.repetition_penalty != 1.0) | (batch.frequency_penalty != 0.0) | (batch.presence_penalty != 0.0)
    )
    x = jax.lax.cond(
        any_penalty,
        lambda: apply_penalties(
            logits, output_counts, prompt_mask,
            batch.repetition_penalty, batch.frequency_penalty, batch.presence_penalty,
        ),  # fmt: skip
        lambda: logits,
    )
    x = x + logit_bias

    # Stop ids may not end a sequence before min_new_tokens: point inactive or padding
    # (-1) entries past the vocab so mode="drop" skips them (negative ids would wrap).
    blocking = (batch.num_generated < batch.min_new_tokens)[:, None] & (batch.stop_ids >= 0)
    stop_cols = jnp.where(blocking, batch.stop_ids, vocab)  # [B, S]
    x = x.at[jnp.arange(num_rows)[:, None], stop_cols].set(-jnp.inf, mode="drop")

    if allowed_mask is not None:
        x = jnp.where(_unpack_bitmask(allowed_mask, vocab), x, -jnp.inf)

    greedy_tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)
    tokens = jax.lax.cond(
        jnp.all(batch.temperature <= 0),
        lambda: greedy_tokens,
        lambda: jnp.where(batch.temperature > 0, _draw(x, batch), greedy_tokens),
    )

    chosen_logprobs = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    if top_logprobs_num > 0:
        top_logprobs, top_ids = jax.lax.top_k(raw_logprobs, top_logprobs_num)
    else:
        top_logprobs = jnp.zeros((num_rows, 0), jnp.float32)
        top_ids = jnp.zeros((num_rows, 0), jnp.int32)
    return SampleOutput(tokens, chosen_logprobs, top_ids.astype(jnp.int32), top_logprobs)


def update_output_counts(
    output_counts: jax.Array,  # [max_slots, V] i32
    rows: jax.Array,  # [B] i32 slot of each sampled token (padding -> a dummy slot)
    tokens: jax.Array,  # [B] i32
) -> jax.Array:
    """Add one count per sampled token to its slot's row (duplicate slots accumulate)."""
    return output_counts.at[rows, tokens].add(1, mode="drop")
