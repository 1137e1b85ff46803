"""Errors shared across the engine's seams."""

__all__ = ["EngineUnavailableError", "InvalidRequestError"]


class InvalidRequestError(ValueError):
    """A request the engine refuses before scheduling it.

    The message says what to fix (which field, what was expected, what was given). The
    HTTP layer maps it to a 400 response.
    """


class EngineUnavailableError(RuntimeError):
    """The engine cannot take requests: it is shut down, or its scheduler died.

    The HTTP layer maps it to a 503 response.
    """
