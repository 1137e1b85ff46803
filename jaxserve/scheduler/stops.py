"""StopChecker: the one place that decides when a request stops, and what text it shows.

A request stops on a stop token (eos unless `ignore_eos`, `stop_token_ids`; not before
`min_new_tokens`), at `max_new_tokens` or the context length, or when its text contains
a stop string or matches a stop regex. The text is detokenized incrementally with the
prompt as context, one token at a time, and handed out as deltas that never take back
what was sent: a tail that could still grow into a stop string is held back until it is
decided. Every check looks only at the new text and the held-back tail, so the work per
token does not grow with the length of the output.
"""

from __future__ import annotations

import re

from jaxserve.sampling import SamplingParams
from jaxserve.tokenizer import IncrementalDetokenizer

# A stop regex is searched in the unsent text plus this much sent text before it: sent
# text is never taken back, so a match that starts there cuts at the end of what was sent.
REGEX_LOOKBACK = 256


class StopChecker:
    def __init__(self, tokenizer, prompt_ids, params: SamplingParams, stop_ids: frozenset[int], token_limit: int):
        self.params = params
        self.stop_ids = stop_ids
        self.token_limit = token_limit  # prompt + max_new_tokens, at most the context length
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens)
        self.stops = params.stop or []
        self.regexes = [re.compile(p) for p in params.stop_regex or []]
        self.sent_tail = ""  # the last REGEX_LOOKBACK characters sent (regex context)
        self.unsent = ""  # decoded but held back: it may still become a stop string

    def on_token(self, token: int, num_outputs: int, num_tokens: int) -> tuple[str, dict | None]:
        """Fold in one new output token; returns (text to send now, finish reason or None)."""
        params = self.params
        text = self.detok.add(token)
        reason = None
        if token in self.stop_ids and num_outputs >= params.min_new_tokens:
            reason = {"type": "stop", "matched": token}
        elif num_tokens >= self.token_limit:
            reason = {"type": "length", "length": num_outputs}
        if reason is not None:
            text += self.detok.flush()
        if not self.stops and not self.regexes:  # nothing to hold back or search for
            return text, reason
        self.unsent += text
        matched = self._text_stop()
        if matched is not None:
            return matched
        return self._send(final=reason is not None), reason

    def finish_text(self) -> str:
        """Whatever is still held back, for a request that ends for another reason (abort)."""
        self.unsent += self.detok.flush()
        return self._send(final=True)

    def _text_stop(self) -> tuple[str, dict] | None:
        keep = self.params.no_stop_trim
        best: tuple[int, str] | None = None  # (cut position in unsent, matched)
        for stop in self.stops:
            i = self.unsent.find(stop)
            if i >= 0 and (best is None or i < best[0]):
                best = (i + len(stop) if keep else i, stop)
        if self.regexes:
            context = self.sent_tail + self.unsent
            offset = len(self.sent_tail)
            for rx in self.regexes:
                m = rx.search(context)
                if m and (best is None or m.start() - offset < best[0]):
                    best = (max((m.end() if keep else m.start()) - offset, 0), m.group(0))
        if best is None:
            return None
        cut, matched = best
        self.unsent = self.unsent[:cut]
        return self._send(final=True), {"type": "stop", "matched": matched}

    def _send(self, final: bool) -> str:
        hold = 0 if final else _stop_prefix_len(self.unsent, self.stops)
        out = self.unsent[: len(self.unsent) - hold]
        self.unsent = self.unsent[len(out) :]
        if self.regexes and out:
            self.sent_tail = (self.sent_tail + out)[-REGEX_LOOKBACK:]
        return out


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold
