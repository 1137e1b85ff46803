"""Validation of one `/generate` call: the only place a request's fields are checked.

`GenerateInput` is what the engine runs: token-id prompts (text is tokenized by the
caller, off the event loop), per-prompt `SamplingParams`, user-visible rids and logprob
options. Everything a request can get wrong raises `InvalidRequestError` here with a
message that says what to fix, before anything is scheduled.
"""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np

from jaxserve.constrained import GrammarSpec, spec_of
from jaxserve.errors import InvalidRequestError
from jaxserve.runner import MAX_STOP_IDS, MAX_TOP_LOGPROBS
from jaxserve.sampling import SamplingParams


@dataclasses.dataclass
class LogprobOptions:
    """The logprob fields of `/generate`, shared by every prompt of one call."""

    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output tokens only (a prefill-only call: its whole input)
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False


@dataclasses.dataclass
class GenerateInput:
    prompts: list[np.ndarray]  # token ids per prompt
    params: list[SamplingParams]  # per prompt; `n` branches share a prompt
    rids: list[str]  # per prompt, as the client knows them
    logprobs: LogprobOptions
    session: object = None  # a Session: one prompt, appended to its conversation
    batched: bool = False  # the input was a list: the answer is a list
    specs: list[GrammarSpec | None] = dataclasses.field(default_factory=list)  # per prompt: its constraint
    grammars: list = dataclasses.field(default_factory=list)  # per prompt: the compiled Grammar, or None

    @property
    def num_branches(self) -> int:
        return sum(p.n for p in self.params)

    def branch_rid(self, prompt: int, branch: int) -> str:
        return self.rids[prompt] if self.params[prompt].n == 1 else f"{self.rids[prompt]}-{branch}"


def split_prompts(text, input_ids) -> tuple[list[str] | None, list[list[int]] | None, bool]:
    """(texts, id lists, batched) from SGLang's `text` / `input_ids` fields."""
    if (text is None) == (input_ids is None):
        raise InvalidRequestError("give exactly one of `text` (prompt) and `input_ids`")
    if text is not None:
        if isinstance(text, str):
            return [text], None, False
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            return list(text), None, True
        raise InvalidRequestError("`text` must be a string or a non-empty list of strings")
    if isinstance(input_ids, list) and input_ids and all(isinstance(x, list) for x in input_ids):
        return None, input_ids, True
    if isinstance(input_ids, list) and not any(isinstance(x, list) for x in input_ids):
        return None, [input_ids], False
    raise InvalidRequestError("`input_ids` must be a list of token ids or a non-empty list of such lists")


def check_input(id_lists: list[list[int]], sampling_params, rid, logprobs: LogprobOptions, session, batched: bool, *,
                vocab_size: int, context_length: int, num_eos: int) -> GenerateInput:
    """Validate everything about one call (see the module doc)."""
    count = len(id_lists)
    params_list = _per_prompt("sampling_params", sampling_params, count, dict)
    rids = _per_prompt("rid", rid, count, str)
    rids = [r if r is not None else uuid.uuid4().hex for r in rids]
    if len(set(rids)) != count:
        raise InvalidRequestError("`rid` values must be unique within a request")
    if not 0 <= logprobs.top_logprobs_num <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}]")
    params = [SamplingParams.from_dict(p) for p in params_list]
    if logprobs.return_logprob and logprobs.logprob_start_len < 0 and all(p.max_new_tokens == 0 for p in params):
        # Prefill only: the input is all there is to score (SGLang's frontend asks for the
        # unconditional logprobs of `select` this way and reads them from the first token).
        logprobs = dataclasses.replace(logprobs, logprob_start_len=0)
    if session is not None:
        if count != 1 or params[0].n != 1:
            raise InvalidRequestError(f"session {session.id} takes one prompt at a time, with n=1")
        id_lists = [session.tokens.tolist() + list(id_lists[0])]
    prompts = []
    for ids, p in zip(id_lists, params):
        prompt = _check_ids(ids, vocab_size, context_length)
        p.validate(vocab_size)
        if len(p.stop_token_ids or []) + num_eos > MAX_STOP_IDS:
            raise InvalidRequestError(f"at most {MAX_STOP_IDS - num_eos} stop_token_ids")
        if logprobs.return_logprob and logprobs.logprob_start_len >= len(prompt):
            raise InvalidRequestError(
                f"logprob_start_len {logprobs.logprob_start_len} must be below the prompt length {len(prompt)}")
        total = len(prompt) + p.max_new_tokens
        if session is None and total > context_length:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens and max_new_tokens is {p.max_new_tokens}: {total} tokens exceed "
                f"the context length {context_length}; lower max_new_tokens or shorten the prompt")
        prompts.append(prompt)
    return GenerateInput(prompts, params, rids, logprobs, session, batched, [spec_of(p) for p in params])


def _per_prompt(name: str, value, count: int, kind: type) -> list:
    """A field that is one value for every prompt, or a list with one per prompt."""
    values = value if isinstance(value, list) else [value] * count
    if len(values) != count:
        raise InvalidRequestError(f"`{name}` has {len(values)} entries for {count} prompts")
    for v in values:
        if v is not None and not isinstance(v, kind):
            raise InvalidRequestError(f"`{name}` must be {'an object' if kind is dict else 'a string'} "
                                      "(or a list of them, one per prompt)")
    return values


def _check_ids(ids, vocab: int, context_length: int) -> np.ndarray:
    if not isinstance(ids, list) or not ids:
        raise InvalidRequestError("the prompt is empty: give non-empty `text` or `input_ids`")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise InvalidRequestError(f"`input_ids` must be integers in [0, {vocab})")
    if len(ids) >= context_length:
        raise InvalidRequestError(
            f"the prompt has {len(ids)} tokens; the context length is {context_length}: shorten it")
    return np.asarray(ids, np.int32)
