"""Errors shared across the engine's seams."""

__all__ = ["InvalidRequestError"]


class InvalidRequestError(ValueError):
    """A request the engine refuses before scheduling it.

    The message says what to fix (which field, what was expected, what was given). The
    HTTP layer maps it to a 400 response.
    """
