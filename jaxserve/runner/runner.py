"""ModelRunner: params, the KV pool and the row state on the mesh, and the jitted programs.

A step is two programs, so that a grammar mask for step N (which needs the token step
N-1 sampled) can be filled on the host while step N's forward runs:

- `forward(batch)`: expands the uploaded `StepBatch`, runs the model over the ragged
  batch (writing K/V into the donated pool) and returns the logits of each sequence's
  last token and the final hidden states;
- `sample(fwd, rows, emit)`: penalties and bias (gathered from the rows only when some row
  uses them), the sampler, raw logprobs and, only when some row asked, top logprobs; it
  records each sampled token in its row, where the next `forward` reads it.

Both return device arrays at once (JAX dispatches asynchronously); `fetch` brings a
step's small results to the host. Input-token logprobs are a third program over at most
`INPUT_LOGPROB_ROWS` hidden states at a time, run only for positions that asked for them.
Every program has fixed shapes per token bucket and is compiled at warm-up; a listener on
JAX's compile events counts compilations (`compile_count()`) so tests and
`/get_server_info` can check that serving never compiles.
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
from jaxserve.runner.batch import StepBatch, expand, max_page_updates
from jaxserve.runner.rows import RowState, RowValues, dense_bias, write_row, write_vocab_row
from jaxserve.weights import LoadedModel

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
INPUT_LOGPROB_ROWS = 128  # hidden states per input-logprob call: bounds its [rows, V] buffer

_compiles = [0]


def _on_jax_event(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_jax_event)


def compile_count() -> int:
    """XLA compilations in this process so far (any engine, any function)."""
    return _compiles[0]


def token_buckets(max_tokens: int, extra: int, smallest: int = 8) -> list[int]:
    """Powers of two from `smallest` up to `max_tokens`, plus `max_tokens` and `extra`
    (the decode batch of `max_running_requests`)."""
    buckets, b = {max_tokens}, smallest
    while b < max_tokens:
        buckets.add(b)
        b *= 2
    if extra <= max_tokens:
        buckets.add(extra)
    return sorted(buckets)


@dataclasses.dataclass
class Forward:
    logits: jax.Array  # [S, V] of each sequence's last token
    hidden: jax.Array  # [T, H] final hidden states, for input logprobs


@dataclasses.dataclass
class Sampled:
    tokens: jax.Array  # [S] int32
    logprobs: jax.Array  # [S] float32
    top_ids: jax.Array  # [S, MAX_TOP_LOGPROBS] (zeros unless some row wants them)
    top_logprobs: jax.Array


def _top_logprobs(log_probs, want_top):
    rows = log_probs.shape[0]
    return jax.lax.cond(
        want_top, lambda: tuple(jax.lax.top_k(log_probs, MAX_TOP_LOGPROBS)),
        lambda: (jnp.zeros((rows, MAX_TOP_LOGPROBS), jnp.float32), jnp.zeros((rows, MAX_TOP_LOGPROBS), jnp.int32)))


class ModelRunner:
    def __init__(self, model: LoadedModel, num_pages: int, max_running: int, max_step_tokens: int,
                 context_length: int):
        self.model = model
        self.num_pages = num_pages
        self.max_running = max_running
        self.page_size = model.page_size
        self.buckets = token_buckets(max_step_tokens, max_running)
        self.context_length = context_length
        self.pages_per_seq = -(-context_length // model.page_size)
        self.vocab = model.config.vocab_size
        self.num_rows = max_running + 1  # row 0: the dummy row of padded entries
        self.input_logprob_rows = INPUT_LOGPROB_ROWS
        # Pin every array a program reads and returns to one sharding: an output whose
        # sharding the compiler chose differently would recompile the next step.
        self.replicated = NamedSharding(model.mesh, P())
        self.kv_sharding = sharding.kv_sharding(model.config, model.mesh)
        self.reset()

    def reset(self) -> None:
        """(Re)create the KV pool and the row state, e.g. after a failed step lost them."""
        self.k_cache = self.v_cache = None  # free the old pool before allocating the new one
        self.k_cache, self.v_cache = self.model.new_kv_cache(self.num_pages)
        put = functools.partial(jax.device_put, device=self.replicated)
        self.rows = jax.tree.map(put, RowState.zeros(self.num_rows, self.vocab))
        self.page_table = put(np.zeros((self.num_rows, self.pages_per_seq), np.int32))  # [rows, pages_per_seq]

    def lost_state(self) -> bool:
        """Whether a failed program took donated buffers with it."""
        arrays = [self.k_cache, self.v_cache, self.page_table, *jax.tree.leaves(self.rows)]
        return any(a.is_deleted() for a in arrays)

    # ---- shapes ----

    def max_seqs(self, num_tokens: int) -> int:
        return min(num_tokens, self.max_running)

    def bucket(self, num_tokens: int) -> int:
        return next(b for b in self.buckets if b >= num_tokens)

    def max_updates(self, num_tokens: int) -> int:
        return max_page_updates(num_tokens, self.max_seqs(num_tokens), self.page_size)

    # ---- the programs ----

    def _constrain(self, tree):
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.replicated), tree)

    @functools.cached_property
    def _forward(self):
        graphdef, page_size = self.model.graphdef, self.page_size

        def forward(params, k_cache, v_cache, page_table, last_token, batch: StepBatch):
            fb, page_table = expand(batch, page_table, last_token, page_size)
            model = nnx.merge(graphdef, params)
            hidden, k_cache, v_cache = model(fb, k_cache, v_cache)
            last = jnp.maximum(batch.cu_q_lens[1:] - 1, 0)  # [S] each sequence's last token
            logits = model.logits(hidden[last])  # [S, V]
            k_cache, v_cache = (jax.lax.with_sharding_constraint(x, self.kv_sharding) for x in (k_cache, v_cache))
            return logits, hidden, k_cache, v_cache, self._constrain(page_table)

        return jax.jit(forward, donate_argnums=(1, 2, 3))

    @functools.cached_property
    def _sample(self):
        def sample(logits, state: RowState, rows, emit):
            batch = state.gather(rows)
            adjust = state.adjust[rows] & emit  # [S]

            def adjusted():  # the [S, V] gathers happen only in this branch
                return sampling.adjust_logits(logits, batch, state.output_counts[rows], state.prompt_mask[rows],
                                              state.logit_bias[rows])

            any_adjust = jnp.any(adjust)
            out = sampling.sample(logits, batch, adjusted=jax.lax.cond(any_adjust, adjusted, lambda: logits))
            top_lp, top_ids = _top_logprobs(jax.nn.log_softmax(logits, axis=-1), jnp.any(state.want_top[rows] & emit))
            written = jnp.where(emit, rows, 0)  # rows that did not sample write to the dummy row
            counted = jnp.where(adjust, rows, 0)
            counts = jax.lax.cond(any_adjust, lambda: sampling.update_output_counts(state.output_counts, counted,
                                                                                      out.tokens),
                                  lambda: state.output_counts)
            new_sampling = dataclasses.replace(batch, num_generated=state.sampling.num_generated.at[written].add(1))
            state = dataclasses.replace(
                state, output_counts=counts, last_token=state.last_token.at[written].set(out.tokens),
                sampling=dataclasses.replace(state.sampling, num_generated=new_sampling.num_generated))
            return out.tokens, out.logprobs, top_ids, top_lp, self._constrain(state)

        return jax.jit(sample, donate_argnums=(1,))

    @functools.cached_property
    def _input_logprobs(self):
        graphdef = self.model.graphdef

        def input_logprobs(params, hidden, positions, targets, want_top):
            log_probs = jax.nn.log_softmax(nnx.merge(graphdef, params).logits(hidden[positions]), axis=-1)  # [L, V]
            chosen = jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
            top_lp, top_ids = _top_logprobs(log_probs, want_top)
            return chosen, top_ids, top_lp

        return jax.jit(input_logprobs)

    @functools.cached_property
    def _write_row(self):
        def fn(state, page_table, row, values):
            state, page_table = write_row(state, page_table, row, values)
            return self._constrain(state), self._constrain(page_table)

        return jax.jit(fn, donate_argnums=(0, 1))

    @functools.cached_property
    def _write_vocab_row(self):
        return jax.jit(lambda *a: self._constrain(write_vocab_row(*a)), donate_argnums=(0,))

    @functools.cached_property
    def _write_page_row(self):
        return jax.jit(lambda table, row, pages: self._constrain(table.at[row].set(pages)), donate_argnums=(0,))

    # ---- calls (each returns at once; results stay on the device until fetched) ----

    def forward(self, batch: StepBatch) -> Forward:
        logits, hidden, self.k_cache, self.v_cache, self.page_table = self._forward(
            self.model.params, self.k_cache, self.v_cache, self.page_table, self.rows.last_token, batch)
        return Forward(logits, hidden)

    def sample(self, fwd: Forward, rows: np.ndarray, emit: np.ndarray) -> Sampled:
        tokens, logprobs, top_ids, top_lp, self.rows = self._sample(fwd.logits, self.rows, rows, emit)
        return Sampled(tokens, logprobs, top_ids, top_lp)

    def input_logprobs(self, fwd: Forward, positions: np.ndarray, targets: np.ndarray, want_top: bool):
        """Logprobs of `targets` [L] under the hidden states at `positions` [L] (padded to
        `INPUT_LOGPROB_ROWS`); device arrays (chosen [L], top ids, top logprobs)."""
        return self._input_logprobs(self.model.params, fwd.hidden, positions, targets, np.bool_(want_top))

    def set_row(self, row: int, params: sampling.SamplingParams, seed: int, stop_ids, *, tokens: np.ndarray,
                num_prompt: int, want_top: bool, pages: np.ndarray) -> None:
        """Write an admitted request's row: sampling parameters, page table and, when it
        uses penalties or a logit bias, its vocabulary state recounted from `tokens`."""
        num_generated = len(tokens) - num_prompt
        values = RowValues.build(params, seed, stop_ids, num_generated, want_top, int(tokens[-1]), pages,
                                 self.pages_per_seq)
        self.rows, self.page_table = self._write_row(self.rows, self.page_table, np.int32(row), values)
        if values.adjust[0]:
            padded = np.full(self.context_length, self.vocab, np.int32)  # [context]; vocab = dropped
            padded[: len(tokens)] = tokens
            self.rows = self._write_vocab_row(self.rows, np.int32(row), padded, np.int32(num_prompt),
                                              dense_bias(params.logit_bias, self.vocab))

    def write_page_row(self, row: int, pages: np.ndarray) -> None:
        """Rewrite a whole page-table row (rare: when a prefill's pages are deduplicated)."""
        padded = np.zeros(self.pages_per_seq, np.int32)
        padded[: len(pages)] = pages
        self.page_table = self._write_page_row(self.page_table, np.int32(row), padded)

    # ---- warm-up ----

    def warmup(self) -> None:
        """Compile every program for every bucket."""
        for n in self.buckets:
            seqs = self.max_seqs(n)
            shapes = [False, True] if seqs == n else [False]  # decode-only steps need T == S
            for decode_only in shapes:
                batch = dataclasses.replace(StepBatch.empty(n, seqs, self.max_updates(n)), decode_only=decode_only)
                fwd = self.forward(batch)
            self.sample(fwd, np.zeros(seqs, np.int32), np.zeros(seqs, bool))
            zeros = np.zeros(INPUT_LOGPROB_ROWS, np.int32)
            self.input_logprobs(fwd, zeros, zeros, want_top=False)
        for params in (sampling.SamplingParams(repetition_penalty=1.1), sampling.SamplingParams()):  # row 0 ends neutral
            self.set_row(0, params, 0, (), tokens=np.zeros(1, np.int32), num_prompt=1, want_top=False,
                         pages=np.zeros(0, np.int32))
        self.write_page_row(0, np.zeros(0, np.int32))
        jax.block_until_ready(self.page_table)
        logger.info("warm-up compiled %d token buckets: %s", len(self.buckets), self.buckets)
