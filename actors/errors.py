"""The errors of the wiring, which errors of every package are worth retrying, and how to say them."""

from __future__ import annotations

from urllib.parse import urlsplit

from dramatiq.middleware import MiddlewareError

from kvstore.errors import (
    InvalidFilter,
    InvalidKey,
    InvalidValue,
    KeyNotFound,
    MemsyncError,
    NothingToRollBack,
    RedisServerMissing,
    VersionNotFound,
)
from vectorstore.errors import EmbeddingRejected, InvalidQuery, LocalModelMissing

__all__ = [
    "INPUT_ERRORS",
    "PERMANENT_ERRORS",
    "ActorsError",
    "InvalidPayload",
    "LocalStackError",
    "MemsyncError",
    "RefusedAtSend",
    "chroma_failed",
    "is_permanent",
    "redis_unreachable",
    "where",
]


class ActorsError(MemsyncError):
    """Raised by the wiring (payloads, one-off runs, the local stack); the root of its errors.

    `MemsyncError`, the root of every package's errors, is the one to catch for all of them.
    """


class InvalidPayload(ActorsError):
    """Raised when a message's arguments do not make a valid sync or rollback."""


class RefusedAtSend(InvalidPayload, MiddlewareError):
    """Raised by `send()` when the payload would fail in the worker: nothing was sent.

    A MiddlewareError, so that Dramatiq lets it reach the sender rather than only logging it.
    """


class LocalStackError(ActorsError):
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
    InvalidFilter,
    RedisServerMissing,
)


#: Errors that say the input itself is bad (a one-off run exits 2 for them).
INPUT_ERRORS: tuple[type[Exception], ...] = (
    InvalidPayload,
    InvalidKey,
    InvalidValue,
    InvalidFilter,
    InvalidQuery,
)


def is_permanent(error: BaseException) -> bool:
    """Whether `error` is a failure for good; anything else (unreachable servers, 429, 5xx) is retried."""
    return isinstance(error, PERMANENT_ERRORS)


def redis_unreachable(url: str, *, local: bool) -> str:
    """What to say when Redis cannot be reached: where (never the password), and what to try."""
    hint = "start it with `memsync up`" if local else "is REDIS_URL right, and is Redis running?"
    return f"Redis is unreachable at {where(url, 6379)}; {hint}"


def chroma_failed(error: BaseException, url: str, *, local: bool) -> str:
    """What to say when Chroma failed a command's request: what it said, where, and what to try."""
    hint = "start it with `memsync up`" if local else "is CHROMA_URL right, and is Chroma running?"
    return f"{error} (Chroma at {where(url, 8000)}); {hint}"


def where(url: str, default_port: int) -> str:
    """A server's host and port (or socket path) from its URL, without the URL's password."""
    parts = urlsplit(url)
    return parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or default_port}"
