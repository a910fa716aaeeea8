"""Errors the core raises for input it refuses. Transports map them to 4xx / INVALID_ARGUMENT."""

from __future__ import annotations

SHOWN_CHARS = 64


def shown(value: object) -> str:
    """``value`` as an error message quotes it: its repr, cut to a short prefix (an
    error body must not echo a 60,000-character id back)."""
    if isinstance(value, str) and len(value) > SHOWN_CHARS:
        return f"{value[:SHOWN_CHARS]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS + 2 else f"{text[:SHOWN_CHARS]}..."


class InvalidInput(ValueError):
    """Input that breaks a rule of the domain; nothing was changed.

    ``code`` is machine-readable and stable, ``field`` names the offending field when
    there is one.
    """

    def __init__(self, message: str, *, code: str = "invalid_request", field: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field


class NotFound(LookupError):
    """A plan or consumer the caller named does not exist."""

    def __init__(self, message: str, *, code: str):
        super().__init__(message)
        self.message = message
        self.code = code


class Conflict(Exception):
    """The request is valid but contradicts the current state (e.g. deleting a plan
    consumers are still bound to); nothing was changed."""

    def __init__(self, message: str, *, code: str):
        super().__init__(message)
        self.message = message
        self.code = code
