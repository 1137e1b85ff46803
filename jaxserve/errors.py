"""Errors shared across the engine's seams."""

__all__ = ["EngineOverloadedError", "EngineUnavailableError", "InvalidRequestError"]


class InvalidRequestError(ValueError):
    """A request the engine refuses before scheduling it.

    The message says what to fix (which field, what was expected, what was given). The
    HTTP layer maps it to a 400 response.
    """


class EngineUnavailableError(RuntimeError):
    """The engine cannot take requests: it is shut down, or its scheduler died.

    The HTTP layer maps it to a 503 response.
    """


class EngineOverloadedError(RuntimeError):
    """The engine is healthy but full: the request queue (`--max-queued-requests`) or the
    open sessions (`--max-sessions`) are at their bound. Nothing was scheduled.

    The HTTP layer maps it to a 503 response with a `Retry-After` header.
    """

    retry_after_s = 1
