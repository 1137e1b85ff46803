"""Per-request state that stays on the device, one row per running request.

A running request owns a *row* (1..max_running; row 0 is the dummy row of padded batch
entries). Everything a step needs about a request that does not change from step to step
lives in its row and is written once at admission: its sampling parameters, its page
table, and, only for requests that use penalties or a logit bias, its vocabulary-wide
state (output token counts, prompt token set, bias). A step then uploads only the row
index of each batch entry, and the sampler gathers what it needs. The row also holds the
request's last sampled token, so the next step can feed it without a round trip to the
host (the overlap loop's future tokens), and its count of generated tokens.

The small per-row values are packed into one int32 and one float32 table, so a step
passes (and donates) two small arrays instead of one per field: each donated buffer
costs a few microseconds of dispatch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sampling import SamplingBatch, SamplingParams

MAX_STOP_IDS = 16
# int32 table columns; stop ids fill the last MAX_STOP_IDS columns.
TOP_K, MIN_NEW, NUM_GENERATED, SEED, WANT_TOP, ADJUST, LAST_TOKEN, STOP_IDS = range(8)
NUM_INTS = STOP_IDS + MAX_STOP_IDS
# float32 table columns.
FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowState:
    ints: jax.Array  # [rows, NUM_INTS] int32 (see the column names above)
    floats: jax.Array  # [rows, len(FLOATS)] float32
    output_counts: jax.Array  # [rows, V] int32 (only ADJUST rows are kept up to date)
    prompt_mask: jax.Array  # [rows, V] bool
    logit_bias: jax.Array  # [rows, V] float32

    @staticmethod
    def zeros(num_rows: int, vocab: int) -> "RowState":
        ints, floats = pack(SamplingBatch.build([], pad_to=num_rows, max_stop_ids=MAX_STOP_IDS), num_rows)
        return RowState(ints, floats, np.zeros((num_rows, vocab), np.int32), np.zeros((num_rows, vocab), bool),
                        np.zeros((num_rows, vocab), np.float32))

    def gather(self, rows: jax.Array) -> SamplingBatch:
        """The sampling parameters of batch entries [B] (jittable)."""
        ints, floats = self.ints[rows], self.floats[rows]
        f = {name: floats[:, i] for i, name in enumerate(FLOATS)}
        return SamplingBatch(
            **f, top_k=ints[:, TOP_K], min_new_tokens=ints[:, MIN_NEW], num_generated=ints[:, NUM_GENERATED],
            stop_ids=ints[:, STOP_IDS:], seeds=jax.lax.bitcast_convert_type(ints[:, SEED], jnp.uint32))


def pack(batch: SamplingBatch, num_rows: int, want_top=False, adjust=False, last_token=0):
    """Host (ints, floats) tables of a SamplingBatch of `num_rows` rows."""
    ints = np.zeros((num_rows, NUM_INTS), np.int32)
    ints[:, TOP_K], ints[:, MIN_NEW], ints[:, NUM_GENERATED] = batch.top_k, batch.min_new_tokens, batch.num_generated
    ints[:, SEED] = np.asarray(batch.seeds, np.uint32).view(np.int32)
    ints[:, WANT_TOP], ints[:, ADJUST], ints[:, LAST_TOKEN] = want_top, adjust, last_token
    ints[:, STOP_IDS:] = batch.stop_ids
    floats = np.stack([np.asarray(getattr(batch, name), np.float32) for name in FLOATS], axis=1)
    return ints, floats


def row_values(params: SamplingParams, seed: int, stop_ids, num_generated: int, want_top: bool, last_token: int,
               pages: np.ndarray, pages_per_seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What admission writes into one row: (ints [NUM_INTS], floats [len(FLOATS)], page row)."""
    batch = SamplingBatch.build([(params, seed, num_generated, sorted(stop_ids))], pad_to=1, max_stop_ids=MAX_STOP_IDS)
    ints, floats = pack(batch, 1, want_top, uses_vocab_state(params), last_token)
    page_row = np.zeros(pages_per_seq, np.int32)
    page_row[: len(pages)] = pages
    return ints[0], floats[0], page_row


def uses_vocab_state(params: SamplingParams) -> bool:
    """Whether sampling reads the row's vocabulary-wide state (penalties, logit bias)."""
    return bool(params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                or params.presence_penalty != 0.0 or params.logit_bias)


def write_vocab_row(state: RowState, row, tokens, num_prompt, bias_row) -> RowState:
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
