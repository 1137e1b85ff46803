"""Grammar: one request's position in its grammar, advanced token by token.

The compiler hands out templates; `start()` gives each request (each `n > 1` branch) its
own copy. The scheduler thread drives it: the mask of allowed next tokens (filled for a
whole step at once by `fill_masks`), `accept` for each sampled token, and `forced`, the
tokens the grammar allows no alternative to, for jump-forward. Its state always matches
the request's known output tokens, so a retracted request resumes with it as it is.
"""

from __future__ import annotations

import llguidance

MAX_ERROR_CHARS = 300


class Grammar:
    def __init__(self, matcher: llguidance.LLMatcher, jump_forward: bool = True):
        self.matcher = matcher
        self.jump_forward = jump_forward

    def start(self, jump_forward: bool = True) -> "Grammar":
        """A fresh matcher for one request (the template itself is never advanced)."""
        return Grammar(self.matcher.deep_copy(), jump_forward)

    @property
    def error(self) -> str | None:
        """Why the matcher stopped working: the first line of llguidance's message (the rest
        is a dump of its parser state and the grammar)."""
        if not self.matcher.is_error():
            return None
        first = self.matcher.get_error().strip().splitlines()[0]
        return first if len(first) <= MAX_ERROR_CHARS else first[:MAX_ERROR_CHARS] + "..."

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (only the end of the sequence)."""
        return self.matcher.is_stopped()

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False (and `error` set) if the grammar forbids it."""
        return self.matcher.consume_token(token)

    def forced(self, limit: int) -> list[int]:
        """Advance past the next tokens the grammar forces (at most `limit`) and return them."""
        if not self.jump_forward or limit <= 0 or self.matcher.is_stopped():
            return []
        tokens = self.matcher.compute_ff_tokens()[:limit]
        if tokens and not self.matcher.consume_tokens(tokens):
            return []
        return tokens
