"""What a command line says when it fails: one line, and the exit status (1 failed, 2 bad input)."""

from __future__ import annotations

import redis
from dramatiq.errors import BrokerConnectionError

from actors import state
from actors.deadletter import scrub
from actors.errors import INPUT_ERRORS, chroma_failed, redis_unreachable
from kvstore import StoreUnreachable
from settings import SettingsError
from vectorstore.errors import IndexUnavailable

__all__ = ["explain"]


def explain(error: BaseException) -> tuple[str, int]:
    """The line that says what went wrong (never a secret), and the exit status."""
    if isinstance(error, SettingsError):
        return str(error), 2
    if isinstance(error, StoreUnreachable | redis.ConnectionError | redis.TimeoutError):
        settings = state.settings()
        return redis_unreachable(settings.effective_redis_url(), local=settings.redis_url is None), 1
    if isinstance(error, redis.RedisError):  # only its type: redis-py's text may name the host
        return f"Redis refused a command ({type(error).__name__})", 1
    if isinstance(error, IndexUnavailable):
        settings = state.settings()
        return chroma_failed(error, settings.effective_chroma_url(), local=settings.chroma_url is None), 1
    if isinstance(error, BrokerConnectionError):  # only its type, as above
        return f"the broker is unreachable ({type(error).__name__}); is BROKER_URL right?", 1
    text = scrub(f"{type(error).__name__}: {error}", state.runtime().secrets)
    return text, 2 if isinstance(error, INPUT_ERRORS) else 1
