"""ModelRunner: params, the KV pool and the row state on the mesh, and the jitted programs.

A step is two programs, so that a grammar mask for step N (which needs the token step
N-1 sampled) can be filled on the host while step N's forward runs:

- `forward(batch)`: expands the uploaded `StepBatch`, runs the model over the ragged
  batch (writing K/V into the donated pool; with sparse attention also the pages' key
  bounds) and returns the logits of each sequence's last token, the final hidden states
  and the KV tokens attention read per sequence (summed over layers; 0 without sparse
  attention);
- `sample(fwd)`: penalties and bias (gathered from the rows only when some row
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
from tqdm import tqdm

from jaxserve import sampling, sharding
from jaxserve.constrained import mask_words
from jaxserve.runner.batch import Layout, StepBatch, expand, max_page_updates, rows_and_emit
from jaxserve.runner.rows import (ADJUST, LAST_TOKEN, NUM_GENERATED, WANT_TOP, RowState, dense_bias, row_values,
                                  write_vocab_row)
from jaxserve.weights import LoadedModel
from pallas_kernels.sparse import SparseAttention, new_bounds

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


_MIXED_FLOOR = 8  # the smallest step that prefills; below it, decode steps only


def smallest_bucket(backend: str) -> int:
    """The smallest step: 1 token on CPU, where a step's cost grows with its rows from the
    first one (a single stream pads to nothing); 8 on accelerators, where up to 8 rows cost
    what one does and the kernels' tiles are at least that tall."""
    return 1 if backend == "cpu" else _MIXED_FLOOR


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
    layout: Layout
    buf: jax.Array  # the step's upload, on the device (sampling reads its rows too)
    logits: jax.Array  # [S, V] of each sequence's last token
    hidden: jax.Array  # [T, H] final hidden states, for input logprobs
    read: jax.Array  # [S] KV tokens attention read per sequence, over all layers (0: not counted)


@dataclasses.dataclass
class Sampled:
    packed: jax.Array  # [3, S] int32: tokens, the bits of their float32 logprobs, KV tokens read
    top_ids: jax.Array  # [S, MAX_TOP_LOGPROBS] (zeros unless some row wants them)
    top_logprobs: jax.Array

    def fetch(self, want_top: bool):
        """(tokens [S], logprobs [S], (top logprobs, top ids) or None, KV tokens read [S]) on the host."""
        packed = np.asarray(self.packed)
        top = (np.asarray(self.top_logprobs), np.asarray(self.top_ids)) if want_top else None
        return packed[0], packed[1].view(np.float32), top, packed[2]


def _top_logprobs(logits, want_top):
    """The MAX_TOP_LOGPROBS best log-softmax entries of each row of `logits` [S, V]; the
    log-softmax is built only when some row wants them (zeros otherwise)."""
    rows = logits.shape[0]
    return jax.lax.cond(
        want_top, lambda: tuple(jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), MAX_TOP_LOGPROBS)),
        lambda: (jnp.zeros((rows, MAX_TOP_LOGPROBS), jnp.float32), jnp.zeros((rows, MAX_TOP_LOGPROBS), jnp.int32)))


class ModelRunner:
    def __init__(self, model: LoadedModel, num_pages: int, max_running: int, max_step_tokens: int,
                 context_length: int, sparse: SparseAttention | None = None):
        self.model = model
        self.sparse = sparse  # Quest decode attention; it keeps key bounds beside the pool
        self.num_pages = num_pages
        self.max_running = max_running
        self.page_size = model.page_size
        self.buckets = token_buckets(max_step_tokens, max_running, smallest_bucket(jax.default_backend()))
        self._mixed_buckets = [b for b in self.buckets if self._mixed(b)]  # what `bucket` picks from, per kind
        self._decode_buckets = [b for b in self.buckets if self._mixed(b) or self._decode_only(b)]
        self.context_length = context_length
        self.pages_per_seq = -(-context_length // model.page_size)
        self.vocab = model.config.vocab_size
        # Flattened once: flattening the params' nnx.State on every call costs more than the call.
        self.param_leaves, self.param_treedef = jax.tree.flatten(model.params)
        self.num_rows = max_running + 1  # row 0: the dummy row of padded entries
        self.input_logprob_rows = INPUT_LOGPROB_ROWS
        # Pin every array a program reads and returns to one sharding: an output whose
        # sharding the compiler chose differently would recompile the next step.
        self.replicated = NamedSharding(model.mesh, P())
        self.kv_sharding = sharding.kv_sharding(model.config, model.mesh)
        heads = self.kv_sharding.spec[3] if len(self.kv_sharding.spec) > 3 else None  # bounds split like the pool
        self.bounds_sharding = (NamedSharding(model.mesh, P(None, None, heads, None)),) * 2
        self._all_ones: dict[int, jax.Array] = {}  # sequences per step -> its all-ones grammar mask
        self.reset()

    def reset(self) -> None:
        """(Re)create the KV pool and the row state, e.g. after a failed step lost them."""
        self.k_cache = self.v_cache = self.bounds = None  # free the old pool before allocating the new one
        self.k_cache, self.v_cache = self.model.new_kv_cache(self.num_pages)
        if self.sparse is not None:
            self.bounds = self._new_bounds()
        put = functools.partial(jax.device_put, device=self.replicated)
        self.rows = jax.tree.map(put, RowState.zeros(self.num_rows, self.vocab))
        self.page_table = put(np.zeros((self.num_rows, self.pages_per_seq), np.int32))  # [rows, pages_per_seq]

    def close(self) -> None:
        """Nothing to release here (the arrays go with the runner); a multi-host leader's
        `close` also stops the other nodes (distributed/mirror.py)."""

    def lost_state(self) -> bool:
        """Whether a failed program took donated buffers with it."""
        arrays = [self.k_cache, self.v_cache, self.page_table, *jax.tree.leaves((self.rows, self.bounds))]
        return any(a.is_deleted() for a in arrays)

    # ---- shapes ----

    def max_seqs(self, num_tokens: int) -> int:
        return min(num_tokens, self.max_running)

    def bucket(self, num_tokens: int, decode: bool = False) -> int:
        """The step size for `num_tokens` tokens. Buckets below 8 are compiled for decode
        steps only (one token per sequence, T == S): a step that prefills pads to 8."""
        return next(b for b in (self._decode_buckets if decode else self._mixed_buckets) if b >= num_tokens)

    def _mixed(self, num_tokens: int) -> bool:
        """Whether the bucket also runs steps that prefill."""
        return num_tokens >= min(_MIXED_FLOOR, self.buckets[-1])

    def _decode_only(self, num_tokens: int) -> bool:
        return self.max_seqs(num_tokens) == num_tokens

    def max_updates(self, num_tokens: int) -> int:
        return max_page_updates(num_tokens, self.max_seqs(num_tokens), self.page_size)

    # ---- the programs ----

    def _constrain(self, tree):
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.replicated), tree)

    @functools.cached_property
    def _new_bounds(self):
        """Empty key bounds of every page, compiled once (a reset after a failed step reuses it)."""
        cfg = self.model.config
        shape = (cfg.num_layers, self.num_pages, cfg.num_kv_heads, cfg.head_dim)
        return jax.jit(lambda: tuple(b.reshape(shape) for b in new_bounds(
            cfg.num_layers * self.num_pages, cfg.num_kv_heads, cfg.head_dim)), out_shardings=self.bounds_sharding)

    @functools.cached_property
    def _forward(self):
        graphdef, page_size, treedef = self.model.graphdef, self.page_size, self.param_treedef

        def forward(layout, params, k_cache, v_cache, bounds, page_table, ints, buf):
            fb, page_table = expand(layout, buf, page_table, ints[:, LAST_TOKEN], page_size)
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
            if bounds is None:
                hidden, k_cache, v_cache = model(fb, k_cache, v_cache)
                read = jnp.zeros_like(fb.kv_lens)
            else:
                hidden, k_cache, v_cache, bounds, read = model(fb, k_cache, v_cache, bounds, self.sparse)
                bounds = tuple(jax.lax.with_sharding_constraint(b, self.bounds_sharding[0]) for b in bounds)
            last = jnp.maximum(fb.cu_q_lens[1:] - 1, 0)  # [S] each sequence's last token
            logits = model.logits(hidden[last])  # [S, V]
            k_cache, v_cache = (jax.lax.with_sharding_constraint(x, self.kv_sharding) for x in (k_cache, v_cache))
            return (logits, hidden, self._constrain(read), k_cache, v_cache, bounds, self._constrain(page_table),
                    self._constrain(buf))

        return jax.jit(forward, static_argnums=(0,), donate_argnums=(2, 3, 4, 5))

    @functools.cached_property
    def _sample(self):
        def sample(layout, logits, read, ints, floats, output_counts, prompt_mask, logit_bias, buf, allowed):
            state = RowState(ints, floats, output_counts, prompt_mask, logit_bias)
            rows, emit = rows_and_emit(layout, buf)
            batch = state.gather(rows)
            adjust = (state.ints[rows, ADJUST] > 0) & emit  # [S]

            def adjusted():  # the [S, V] gathers happen only in this branch
                return sampling.adjust_logits(logits, batch, state.output_counts[rows], state.prompt_mask[rows],
                                              state.logit_bias[rows])

            any_adjust = jnp.any(adjust)
            out = sampling.sample(logits, batch, adjusted=adjusted, allowed_mask=allowed, adjusting=any_adjust)
            want_top = jnp.any((state.ints[rows, WANT_TOP] > 0) & emit)
            top_lp, top_ids = _top_logprobs(logits, want_top)
            written = jnp.where(emit, rows, 0)  # rows that did not sample write to the dummy row
            counts = jax.lax.cond(
                any_adjust,
                lambda: sampling.update_output_counts(state.output_counts, jnp.where(adjust, rows, 0), out.tokens),
                lambda: state.output_counts)
            ints = state.ints.at[written, NUM_GENERATED].add(1).at[written, LAST_TOKEN].set(out.tokens)
            packed = jnp.stack([out.tokens, jax.lax.bitcast_convert_type(out.logprobs, jnp.int32), read])
            # Replicated results: any process (node 0 of a multi-host mesh too) reads them whole.
            return (*self._constrain((packed, top_ids, top_lp)), self._constrain(ints), self._constrain(counts))

        # Only the int table and the counts change; the rest of the row state is read, not donated.
        return jax.jit(sample, static_argnums=(0,), donate_argnums=(3, 5))

    @functools.cached_property
    def _input_logprobs(self):
        graphdef = self.model.graphdef

        def input_logprobs(params, hidden, positions, targets, want_top):
            model = nnx.merge(graphdef, jax.tree.unflatten(self.param_treedef, params))
            logits = model.logits(hidden[positions])  # [L, V]
            chosen = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[:, None], axis=-1)[:, 0]
            top_lp, top_ids = _top_logprobs(logits, want_top)
            return self._constrain((chosen, top_ids, top_lp))

        return jax.jit(input_logprobs)

    @functools.cached_property
    def _write_row(self):
        def fn(ints, floats, page_table, row, int_row, float_row, page_row):
            return (self._constrain(ints.at[row].set(int_row)), self._constrain(floats.at[row].set(float_row)),
                    self._constrain(page_table.at[row].set(page_row)))

        return jax.jit(fn, donate_argnums=(0, 1, 2))

    @functools.cached_property
    def _write_vocab_row(self):
        return jax.jit(lambda *a: self._constrain(write_vocab_row(*a)), donate_argnums=(0,))

    @functools.cached_property
    def _write_page_row(self):
        return jax.jit(lambda table, row, pages: self._constrain(table.at[row].set(pages)), donate_argnums=(0,))

    # ---- calls (each returns at once; results stay on the device until fetched) ----

    def forward(self, batch: StepBatch) -> Forward:
        # The step's one upload; it comes back as a device array for `sample`.
        logits, hidden, read, self.k_cache, self.v_cache, self.bounds, self.page_table, buf = self._forward(
            batch.layout, self.param_leaves, self.k_cache, self.v_cache, self.bounds, self.page_table, self.rows.ints,
            batch.buf)
        return Forward(batch.layout, buf, logits, hidden, read)

    def sample(self, fwd: Forward, allowed: np.ndarray | None = None) -> Sampled:
        """Sample each emitting sequence's next token; `allowed` [S, ceil(V/32)] int32 is the
        grammar bitmask (None: every token allowed, a device-resident all-ones mask)."""
        state = self.rows
        if allowed is None:
            allowed = self._all_allowed(fwd.layout.max_seqs)
        else:  # placed like the all-ones mask: another placement would compile another program
            allowed = jax.device_put(allowed, self.replicated)
        packed, top_ids, top_lp, ints, counts = self._sample(fwd.layout.for_sampling, fwd.logits, fwd.read,
                                                             state.ints, state.floats, state.output_counts,
                                                             state.prompt_mask, state.logit_bias, fwd.buf, allowed)
        self.rows = dataclasses.replace(state, ints=ints, output_counts=counts)
        packed.copy_to_host_async()  # the host reads it next; start the copy as soon as it is ready
        return Sampled(packed, top_ids, top_lp)

    def _all_allowed(self, num_seqs: int) -> jax.Array:
        """The all-ones mask of a bucket, made once (a per-runner dict: a cache on the method
        would keep every runner, and its KV pool, alive after its engine shuts down)."""
        mask = self._all_ones.get(num_seqs)
        if mask is None:
            mask = jax.device_put(np.full((num_seqs, mask_words(self.vocab)), -1, np.int32), self.replicated)
            self._all_ones[num_seqs] = mask
        return mask

    def input_logprobs(self, fwd: Forward, positions: np.ndarray, targets: np.ndarray, want_top: bool):
        """Logprobs of `targets` [L] under the hidden states at `positions` [L] (padded to
        `INPUT_LOGPROB_ROWS`); device arrays (chosen [L], top ids, top logprobs)."""
        return self._input_logprobs(self.param_leaves, fwd.hidden, positions, targets, np.bool_(want_top))

    def set_row(self, row: int, params: sampling.SamplingParams, seed: int, stop_ids, *, tokens: np.ndarray,
                num_prompt: int, want_top: bool, pages: np.ndarray) -> None:
        """Write an admitted request's row: sampling parameters, page table and, when it
        uses penalties or a logit bias, its vocabulary state recounted from `tokens`."""
        int_row, float_row, page_row = row_values(params, seed, stop_ids, len(tokens) - num_prompt, want_top,
                                                  int(tokens[-1]), pages, self.pages_per_seq)
        state = self.rows
        ints, floats, self.page_table = self._write_row(state.ints, state.floats, self.page_table, np.int32(row),
                                                        int_row, float_row, page_row)
        self.rows = dataclasses.replace(state, ints=ints, floats=floats)
        if int_row[ADJUST]:
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
        for n in tqdm(self.buckets, desc="compiling step buckets", unit="bucket"):
            seqs = self.max_seqs(n)
            shapes = [False] if self._mixed(n) else []
            shapes += [True] if self._decode_only(n) else []  # decode-only steps need T == S
            if not shapes:
                continue  # a small bucket no decode step can use
            for decode_only in shapes:
                fwd = self.forward(StepBatch(Layout(n, seqs, self.max_updates(n), decode_only)))
            self.sample(fwd)
            zeros = np.zeros(INPUT_LOGPROB_ROWS, np.int32)
            self.input_logprobs(fwd, zeros, zeros, want_top=False)
        for params in (sampling.SamplingParams(repetition_penalty=1.1), sampling.SamplingParams()):  # row 0 ends neutral
            self.set_row(0, params, 0, (), tokens=np.zeros(1, np.int32), num_prompt=1, want_top=False,
                         pages=np.zeros(0, np.int32))
        self.write_page_row(0, np.zeros(0, np.int32))
        jax.block_until_ready(self.page_table)
        logger.info("warm-up compiled %d token buckets: %s", len(self.buckets), self.buckets)
