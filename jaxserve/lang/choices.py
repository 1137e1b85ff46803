"""How `select` turns the scored choices into a decision.

Each method is called with keyword arguments: `choices`, `normalized_prompt_logprobs` (the
mean logprob of each choice's tokens), `input_token_logprobs` (per choice, the
`[logprob, token_id, text]` entries of its tokens), `output_token_logprobs` (empty: nothing
is generated) and, when `requires_unconditional_logprobs`, `unconditional_token_logprobs`
(the same tokens scored with no prefix). The keywords are SGLang's, so a method written for
SGLang works here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] = field(default_factory=dict)


class ChoicesSamplingMethod:
    requires_unconditional_logprobs = False

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        raise NotImplementedError


def _logprobs(entries: list) -> np.ndarray:
    return np.array([0.0 if e[0] is None else e[0] for e in entries], dtype=np.float64)


class TokenLengthNormalized(ChoicesSamplingMethod):
    """The highest mean token logprob."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        best = int(np.argmax(normalized_prompt_logprobs))
        return ChoicesDecision(choices[best], {"normalized_prompt_logprobs": normalized_prompt_logprobs,
                                               "input_token_logprobs": input_token_logprobs,
                                               "output_token_logprobs": output_token_logprobs})


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Token by token: keep the choices whose logprob at this position is the highest; a
    shorter choice continues with its mean logprob."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        width = max(len(e) for e in input_token_logprobs)
        matrix = np.empty((len(choices), width))
        for i, entries in enumerate(input_token_logprobs):
            values = _logprobs(entries)
            matrix[i] = np.concatenate([values, np.full(width - len(values), values.mean())])
        alive = np.arange(len(choices))
        for column in matrix.T:
            alive = alive[column[alive] == column[alive].max()]
            if len(alive) == 1:
                break
        return ChoicesDecision(choices[int(alive[0])], {
            "normalized_prompt_logprobs": normalized_prompt_logprobs, "input_token_logprobs": input_token_logprobs,
            "output_token_logprobs": output_token_logprobs, "greedy_logprob_matrix": matrix.tolist()})


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """The highest mean of (logprob given the prefix - logprob with no prefix): favours the
    choice the prefix makes likely, not the one that is likely anyway."""

    requires_unconditional_logprobs = True

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional_token_logprobs")
        scores = [float((_logprobs(c) - _logprobs(u)).mean())
                  for c, u in zip(input_token_logprobs, unconditional_token_logprobs)]
        return ChoicesDecision(choices[int(np.argmax(scores))], {
            "normalized_prompt_logprobs": normalized_prompt_logprobs, "input_token_logprobs": input_token_logprobs,
            "output_token_logprobs": output_token_logprobs,
            "unconditional_token_logprobs": unconditional_token_logprobs,
            "normalized_unconditional_prompt_logprobs": scores})


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
