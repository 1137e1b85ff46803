"""The on-device sampler: the device side of sampling.

``adjust_logits`` and ``sample`` run inside the runner's jitted sample program on fixed
shapes. The pipeline (vLLM/SGLang semantics): penalties -> logit bias -> block stop ids before
``min_new_tokens`` -> grammar bitmask -> greedy argmax, or temperature -> top-k ->
top-p -> min-p -> categorical draw. Logprobs are always of the *raw* logits, which is
what SGLang reports and what the tests compare against transformers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sampling.params import SamplingParams

__all__ = [
    "SampleOutput",
    "SamplingBatch",
    "apply_penalties",
    "filter_probs",
    "sample",
    "update_output_counts",
]


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
    """[B, ceil(V/32)] u32 or i32 -> [B, V] bool; token v is bit v % 32 of word v // 32."""
    shifts = jnp.arange(32, dtype=jnp.uint32)
    words = allowed_mask if allowed_mask.dtype == jnp.uint32 else jax.lax.bitcast_convert_type(allowed_mask, jnp.uint32)
    bits = (words[:, :, None] >> shifts) & 1  # [B, W, 32]
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


def adjust_logits(
    logits: jax.Array,  # [B, V] f32 raw model logits
    batch: SamplingBatch,
    output_counts: jax.Array,  # [B, V] i32
    prompt_mask: jax.Array,  # [B, V] bool
    logit_bias: jax.Array,  # [B, V] f32
) -> jax.Array:
    """Penalties (skipped when no row uses them), then the logit bias (jittable)."""
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
    return x + logit_bias


def sample(
    logits: jax.Array,  # [B, V] f32 raw model logits
    batch: SamplingBatch,
    adjusted=None,  # [B, V] logits after `adjust_logits`, or a function returning them; None = raw logits
    allowed_mask: jax.Array | None = None,  # [B, ceil(V/32)] u32, bit set = allowed
    top_logprobs_num: int = 0,  # static
    adjusting: jax.Array | None = None,  # bool []: whether `adjusted` differs from the raw logits
) -> SampleOutput:
    """Pick the next token of every row and report raw-logit logprobs (jittable).

    Adjusting, blocking stop ids and masking each make a new [B, V] array (~1 ms each on a
    CPU at B = 32), so they run only in branches taken when some row needs one of them;
    `adjusted` as a function is called only there. The branches return tokens, not logits."""
    logits = logits.astype(jnp.float32)
    num_rows, vocab = logits.shape
    if adjusting is None:
        adjusting = jnp.asarray(adjusted is not None)

    # Stop ids may not end a sequence before min_new_tokens: point inactive or padding
    # (-1) entries past the vocab so mode="drop" skips them (negative ids would wrap).
    blocking = (batch.num_generated < batch.min_new_tokens)[:, None] & (batch.stop_ids >= 0)
    stop_cols = jnp.where(blocking, batch.stop_ids, vocab)  # [B, S]
    masking = jnp.asarray(False)
    if allowed_mask is not None:
        words = allowed_mask.view(jnp.int32) if allowed_mask.dtype == jnp.uint32 else allowed_mask
        masking = jnp.any(words != -1)

    def ruled():  # the logits the rules leave: adjusted, stop ids blocked, masked
        x = logits if adjusted is None else (adjusted() if callable(adjusted) else adjusted).astype(jnp.float32)
        x = x.at[jnp.arange(num_rows)[:, None], stop_cols].set(-jnp.inf, mode="drop")
        if allowed_mask is not None:
            x = jnp.where(_unpack_bitmask(allowed_mask, vocab), x, -jnp.inf)
        return x

    ruling = adjusting | jnp.any(blocking) | masking

    def greedy():
        return jax.lax.cond(ruling, lambda: first_argmax(ruled()), lambda: first_argmax(logits))

    def drawing():  # the ruled logits' [B, V] copy only when some row samples
        x = jax.lax.cond(ruling, ruled, lambda: logits)
        return jnp.where(batch.temperature > 0, _draw(x, batch), first_argmax(x))

    tokens = jax.lax.cond(jnp.all(batch.temperature <= 0), greedy, drawing)

    # log_softmax at the chosen tokens only: the full [B, V] one is built only for top logprobs.
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    chosen_logprobs = chosen - jax.nn.logsumexp(logits, axis=-1)
    if top_logprobs_num > 0:
        top_logprobs, top_ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), top_logprobs_num)
    else:
        top_logprobs = jnp.zeros((num_rows, 0), jnp.float32)
        top_ids = jnp.zeros((num_rows, 0), jnp.int32)
    return SampleOutput(tokens, chosen_logprobs, top_ids.astype(jnp.int32), top_logprobs)


def first_argmax(x: jax.Array, block: int = 512) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (the first index of the row maximum) for rows without NaN.

    In two levels: the maximum of each block of `block` columns, then the first block that
    holds the row's maximum, then the first column in it. Only the first level reads all of
    x, as one plain reduction: XLA's CPU backend runs argmax's (value, index) reduction
    scalar, 3.5 ms on [32, 49152] (docs/BENCHMARKS.md, "Quantized weights")."""
    rows, cols = x.shape
    pad = -cols % block
    blocks = jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf).reshape(rows, -1, block)
    block_max = blocks.max(axis=-1)  # [B, blocks]
    top = block_max.max(axis=-1, keepdims=True)
    first = _first_true(block_max == top)  # [B]
    inside = jnp.take_along_axis(blocks, first[:, None, None], axis=1)[:, 0]  # [B, block]
    return first * block + _first_true(inside == top)


def _first_true(mask: jax.Array) -> jax.Array:
    """The index of the first True of each row of `mask` [B, N] (N when there is none)."""
    return jnp.min(jnp.where(mask, jnp.arange(mask.shape[-1], dtype=jnp.int32), mask.shape[-1]), axis=-1)


def update_output_counts(
    output_counts: jax.Array,  # [num_rows, V] i32
    rows: jax.Array,  # [B] i32 state row of each sampled token (padding -> the dummy row)
    tokens: jax.Array,  # [B] i32
) -> jax.Array:
    """Add one count per sampled token to its row (duplicate rows accumulate)."""
    return output_counts.at[rows, tokens].add(1, mode="drop")
