"""The errors of the wiring, and which errors of every package are worth retrying."""

from __future__ import annotations

from kvstore import InvalidKey, InvalidValue, KeyNotFound, NothingToRollBack, VersionNotFound
from vectorstore import EmbeddingRejected, InvalidQuery, LocalModelMissing

__all__ = [
    "INPUT_ERRORS",
    "PERMANENT_ERRORS",
    "InvalidPayload",
    "LocalStackError",
    "MemsyncError",
    "is_permanent",
]


class MemsyncError(Exception):
    """Raised by the wiring (payloads, one-off runs, the local stack); the root of its errors."""


class InvalidPayload(MemsyncError):
    """Raised when a message's arguments do not make a valid sync or rollback."""


class LocalStackError(MemsyncError):
    """Raised when the embedded Redis or the local Chroma server cannot be started or found."""


#: Errors that no retry can cure: the message is dead-lettered at once, nothing written.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    InvalidPayload,
    InvalidKey,
    InvalidValue,
    KeyNotFound,
    VersionNotFound,
    NothingToRollBack,
    EmbeddingRejected,
    LocalModelMissing,
    InvalidQuery,
)


#: Errors that say the input itself is bad (a one-off run exits 2 for them).
INPUT_ERRORS: tuple[type[Exception], ...] = (InvalidPayload, InvalidKey, InvalidValue)


def is_permanent(error: BaseException) -> bool:
    """Whether `error` is a failure for good; anything else (unreachable servers, 429, 5xx) is retried."""
    return isinstance(error, PERMANENT_ERRORS)
