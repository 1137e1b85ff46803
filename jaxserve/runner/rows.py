"""Per-request state that stays on the device, one row per running request.

A running request owns a *row* (1..max_running; row 0 is the dummy row of padded batch
entries). Everything a step needs about a request that does not change from step to step
lives in its row and is written once at admission: its sampling parameters, its page
table, and, only for requests that use penalties or a logit bias, its vocabulary-wide
state (output token counts, prompt token set, bias). A step then uploads only the row
index of each batch entry, and the sampler gathers what it needs. The row also holds the
request's last sampled token, so the next step can feed it without a round trip to the
host (the overlap loop's future tokens) and its count of generated tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sampling import SamplingBatch, SamplingParams

MAX_STOP_IDS = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowState:
    sampling: SamplingBatch  # [rows] per field; num_generated counts sampled tokens
    want_top: jax.Array  # [rows] bool: the request asked for top logprobs
    adjust: jax.Array  # [rows] bool: penalties or logit bias in use
    last_token: jax.Array  # [rows] int32: the token the request sampled last
    output_counts: jax.Array  # [rows, V] int32 (only `adjust` rows are kept up to date)
    prompt_mask: jax.Array  # [rows, V] bool
    logit_bias: jax.Array  # [rows, V] float32

    @staticmethod
    def zeros(num_rows: int, vocab: int) -> "RowState":
        return RowState(
            sampling=SamplingBatch.build([], pad_to=num_rows, max_stop_ids=MAX_STOP_IDS),
            want_top=np.zeros(num_rows, bool), adjust=np.zeros(num_rows, bool),
            last_token=np.zeros(num_rows, np.int32), output_counts=np.zeros((num_rows, vocab), np.int32),
            prompt_mask=np.zeros((num_rows, vocab), bool), logit_bias=np.zeros((num_rows, vocab), np.float32))

    def gather(self, rows: jax.Array) -> SamplingBatch:
        """The sampling parameters of batch entries [B] (jittable)."""
        return jax.tree.map(lambda x: x[rows], self.sampling)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowValues:
    """What admission writes into one row (host arrays; a one-row SamplingBatch)."""

    sampling: SamplingBatch
    want_top: np.ndarray  # [1] bool
    adjust: np.ndarray  # [1] bool
    last_token: np.ndarray  # [1] int32
    page_row: np.ndarray  # [pages_per_seq] int32

    @staticmethod
    def build(params: SamplingParams, seed: int, stop_ids, num_generated: int, want_top: bool, last_token: int,
              pages: np.ndarray, pages_per_seq: int) -> "RowValues":
        page_row = np.zeros(pages_per_seq, np.int32)
        page_row[: len(pages)] = pages
        return RowValues(
            SamplingBatch.build([(params, seed, num_generated, sorted(stop_ids))], pad_to=1, max_stop_ids=MAX_STOP_IDS),
            np.array([want_top]), np.array([uses_vocab_state(params)]), np.array([last_token], np.int32), page_row)


def uses_vocab_state(params: SamplingParams) -> bool:
    """Whether sampling reads the row's vocabulary-wide state (penalties, logit bias)."""
    return bool(params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                or params.presence_penalty != 0.0 or params.logit_bias)


def write_row(state: RowState, page_table: jax.Array, row, values: RowValues):
    """Write one row of the small state and of the page table (jittable)."""
    def put(column, value):
        return column.at[row].set(value[0])

    state = dataclasses.replace(
        state, sampling=jax.tree.map(put, state.sampling, values.sampling),
        want_top=put(state.want_top, values.want_top), adjust=put(state.adjust, values.adjust),
        last_token=put(state.last_token, values.last_token))
    return state, page_table.at[row].set(values.page_row)


def write_vocab_row(state: RowState, row, tokens, num_prompt, bias_row):
    """Recount a row's vocabulary-wide state from its tokens (jittable).

    `tokens` [context] holds prompt then outputs, padded with the vocabulary size (dropped);
    the first `num_prompt` form the prompt set, the rest are counted as outputs, so a
    request re-admitted after retraction continues with the same penalties.
    """
    vocab = state.output_counts.shape[1]
    index = jnp.arange(tokens.shape[0])
    in_prompt = jnp.where(index < num_prompt, tokens, vocab)
    in_output = jnp.where(index >= num_prompt, tokens, vocab)
    prompt_mask = state.prompt_mask.at[row].set(False).at[row, in_prompt].set(True, mode="drop")
    counts = state.output_counts.at[row].set(0).at[row, in_output].add(1, mode="drop")
    return dataclasses.replace(state, output_counts=counts, prompt_mask=prompt_mask,
                               logit_bias=state.logit_bias.at[row].set(bias_row))


def dense_bias(logit_bias: dict[int, float] | None, vocab: int) -> np.ndarray:
    bias = np.zeros(vocab, np.float32)
    for token, value in (logit_bias or {}).items():
        bias[int(token)] = value
    return bias
