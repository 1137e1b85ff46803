"""ModelRunner: params and the KV pool on the mesh, and the one jitted step.

The step takes a fixed-shape ragged batch padded to a token bucket (powers of two), so a
handful of programs are compiled at warm-up and serving never compiles again; a listener
on JAX's compile events counts the compilations of this process (`compile_count()`) so
tests and `/get_server_info` can check.
Per-sequence sampler state that grows with generation (output token counts for the
penalties, the prompt's token set, logit bias) lives on the device in rows indexed by a
request's slot, so a step uploads only small arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve import sampling, sharding
from jaxserve.models import ForwardBatch
from jaxserve.weights import LoadedModel

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20


_compiles = [0]


def _on_jax_event(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_jax_event)


def compile_count() -> int:
    """XLA compilations in this process so far (any engine, any function)."""
    return _compiles[0]


@dataclasses.dataclass
class StepInput:
    """One step on the host: the padded forward batch and, per sequence row, its sampler row."""

    batch: ForwardBatch
    sample_index: np.ndarray  # [max_seqs] token index whose logits a row samples from
    emit: np.ndarray  # [max_seqs] bool: the row samples a token this step
    slots: np.ndarray  # [max_seqs] sampler-state slot of each row (0 = dummy)
    sampling: sampling.SamplingBatch
    want_top: bool  # any row asked for top logprobs


@dataclasses.dataclass
class StepOutput:
    tokens: np.ndarray  # [max_seqs] int32
    logprobs: np.ndarray  # [max_seqs] float32
    top_ids: np.ndarray  # [max_seqs, MAX_TOP_LOGPROBS]
    top_logprobs: np.ndarray  # [max_seqs, MAX_TOP_LOGPROBS]
    hidden: jax.Array  # [T, H] final hidden states, left on device for input logprobs


def _top_logprobs(log_probs, want_top):
    """Top-MAX_TOP_LOGPROBS (values, ids) of each row, computed only when some row wants them."""
    rows = log_probs.shape[0]
    return jax.lax.cond(
        want_top, lambda: tuple(jax.lax.top_k(log_probs, MAX_TOP_LOGPROBS)),
        lambda: (jnp.zeros((rows, MAX_TOP_LOGPROBS), jnp.float32), jnp.zeros((rows, MAX_TOP_LOGPROBS), jnp.int32)))


def token_buckets(max_tokens: int, smallest: int = 8) -> list[int]:
    buckets, b = [], smallest
    while b < max_tokens:
        buckets.append(b)
        b *= 2
    return buckets + [max_tokens]


class ModelRunner:
    def __init__(self, model: LoadedModel, num_pages: int, max_running: int, max_step_tokens: int,
                 context_length: int):
        self.model = model
        self.num_pages = num_pages
        self.max_running = max_running
        self.buckets = token_buckets(max_step_tokens)
        self.context_length = context_length
        self.pages_per_seq = -(-context_length // model.page_size)
        self.k_cache, self.v_cache = model.new_kv_cache(num_pages)
        vocab = model.config.vocab_size
        slots = max_running + 1  # slot 0: the dummy row of padded sequences
        # Pin every array that a step reads and returns to one sharding: a step output whose
        # sharding the compiler chose differently would recompile the next step.
        self.replicated = NamedSharding(model.mesh, P())
        self.kv_sharding = sharding.kv_sharding(model.config, model.mesh)
        state = lambda dtype: jax.device_put(np.zeros((slots, vocab), dtype), self.replicated)  # noqa: E731
        self.output_counts = state(np.int32)  # [slots, V]
        self.prompt_mask = state(np.bool_)  # [slots, V]
        self.logit_bias = state(np.float32)  # [slots, V]

    def max_seqs(self, num_tokens: int) -> int:
        return min(num_tokens, self.max_running)

    def bucket(self, num_tokens: int) -> int:
        return next(b for b in self.buckets if b >= num_tokens)

    @functools.cached_property
    def _step(self):
        graphdef = self.model.graphdef

        def step(params, k_cache, v_cache, counts, prompt_mask, bias, batch, sample_index, emit, slots,
                 sampling_batch, want_top):
            model = nnx.merge(graphdef, params)
            hidden, k_cache, v_cache = model(batch, k_cache, v_cache)
            logits = model.logits(hidden[sample_index])  # [max_seqs, V]
            out = sampling.sample(logits, sampling_batch, counts[slots], prompt_mask[slots], bias[slots])
            top_lp, top_ids = _top_logprobs(jax.nn.log_softmax(logits, axis=-1), want_top)
            counts = sampling.update_output_counts(counts, jnp.where(emit, slots, 0), out.tokens)
            k_cache, v_cache = (jax.lax.with_sharding_constraint(x, self.kv_sharding) for x in (k_cache, v_cache))
            counts = jax.lax.with_sharding_constraint(counts, self.replicated)
            return out.tokens, out.logprobs, top_ids, top_lp, hidden, k_cache, v_cache, counts

        return jax.jit(step, donate_argnums=(1, 2, 3))

    @functools.cached_property
    def _input_logprobs(self):
        graphdef = self.model.graphdef

        def fn(params, hidden, targets, want_top):
            log_probs = jax.nn.log_softmax(nnx.merge(graphdef, params).logits(hidden), axis=-1)  # [T, V]
            chosen = jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
            top_lp, top_ids = _top_logprobs(log_probs, want_top)
            return chosen, top_ids, top_lp

        return jax.jit(fn)

    @functools.cached_property
    def _set_slot(self):
        def fn(counts, prompt_mask, bias, slot, prompt_ids, bias_row):
            counts = counts.at[slot].set(0)
            prompt_mask = prompt_mask.at[slot].set(False).at[slot, prompt_ids].set(True, mode="drop")
            bias = bias.at[slot].set(bias_row)
            return tuple(jax.lax.with_sharding_constraint(x, self.replicated) for x in (counts, prompt_mask, bias))

        return jax.jit(fn, donate_argnums=(0, 1, 2))

    def step(self, inp: StepInput) -> StepOutput:
        (tokens, logprobs, top_ids, top_lp, hidden, self.k_cache, self.v_cache, self.output_counts) = self._step(
            self.model.params, self.k_cache, self.v_cache, self.output_counts, self.prompt_mask,
            self.logit_bias, inp.batch, inp.sample_index, inp.emit, inp.slots, inp.sampling,
            np.bool_(inp.want_top))
        tokens, logprobs, top_ids, top_lp = jax.device_get((tokens, logprobs, top_ids, top_lp))
        return StepOutput(tokens, logprobs, top_ids, top_lp, hidden)

    def input_logprobs(self, hidden, targets: np.ndarray, want_top: bool):
        """Log-probabilities of `targets` [T] (next tokens) under each hidden state [T, H]."""
        return jax.device_get(self._input_logprobs(self.model.params, hidden, targets, np.bool_(want_top)))

    def set_slot(self, slot: int, prompt_ids: np.ndarray, logit_bias: dict[int, float] | None) -> None:
        """Reset a sampler-state row for a request that takes `slot`."""
        vocab = self.model.config.vocab_size
        bias = np.zeros(vocab, np.float32)
        for token, value in (logit_bias or {}).items():
            bias[int(token)] = value
        # A fixed length (the context) keeps this one compiled program; `vocab` pads are dropped.
        padded = np.full(self.context_length, vocab, np.int32)
        padded[: len(prompt_ids)] = prompt_ids
        self.output_counts, self.prompt_mask, self.logit_bias = self._set_slot(
            self.output_counts, self.prompt_mask, self.logit_bias, np.int32(slot), padded, bias)

    def dummy_input(self, num_tokens: int, decode_only: bool) -> StepInput:
        """An all-padding batch of a bucket's shape, for warm-up."""
        max_seqs = self.max_seqs(num_tokens)
        batch = ForwardBatch.build([([0], 0, [0])], self.model.page_size, num_tokens=num_tokens,
                                   max_seqs=max_seqs, pages_per_seq=self.pages_per_seq)
        batch.num_seqs[:] = 0
        batch.decode_only = decode_only
        rows = np.zeros(max_seqs, np.int32)
        return StepInput(batch, rows, rows.astype(bool), rows,
                         sampling.SamplingBatch.build([], pad_to=max_seqs, max_stop_ids=self.max_stop_ids),
                         want_top=False)

    max_stop_ids = 16

    def warmup(self) -> None:
        """Compile every bucket of the step and of the input-logprob program."""
        for n in self.buckets:
            out = self.step(self.dummy_input(n, decode_only=False))
            self.input_logprobs(out.hidden, np.zeros(n, np.int32), want_top=False)
            if self.max_seqs(n) == n:  # buckets that a step of decode tokens only can use
                self.step(self.dummy_input(n, decode_only=True))
        self.set_slot(0, np.zeros(1, np.int32), None)
        logger.info("warm-up compiled %d token buckets: %s", len(self.buckets), self.buckets)
