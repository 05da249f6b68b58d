"""Where retries live, once: the backoff policy and the middleware that applies it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import dramatiq
import redis
from dramatiq.errors import BrokerConnectionError
from dramatiq.middleware import Middleware

from actors.deadletter import DeadLetters
from actors.errors import is_permanent
from vectorstore import EmbeddingUnavailable

__all__ = ["MAX_RETRY_AFTER_MS", "RetryPolicy", "Retrying"]

#: The longest Retry-After honoured; a server asking for more is retried after this.
MAX_RETRY_AFTER_MS = 3_600_000
#: How long to wait before trying again to put a retry on an unreachable broker.
REQUEUE_PAUSE_MS = 1000

logger = logging.getLogger("memsync.retry")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff from `min_backoff_ms`, doubling to `max_backoff_ms`, for transient errors."""

    max_retries: int = 3
    min_backoff_ms: int = 500
    max_backoff_ms: int = 30_000

    def delay_ms(self, error: BaseException, retries: int) -> int | None:
        """How long to wait before the next attempt, or None when the failure is final.

        `retries` is how many retries have happened already. A server's Retry-After is honoured
        when it asks for more than the backoff.
        """
        if is_permanent(error) or retries >= self.max_retries:
            return None
        backoff = min(self.min_backoff_ms * (1 << min(retries, 32)), self.max_backoff_ms)
        asked = error.retry_after_ms if isinstance(error, EmbeddingUnavailable) else None
        return max(backoff, min(asked or 0, MAX_RETRY_AFTER_MS))

    def is_final(self, error: BaseException, retries: int) -> bool:
        return self.delay_ms(error, retries) is None


class Retrying(Middleware):
    """Retries failed messages by the policy; a final failure is dead-lettered with its reason."""

    def __init__(self, policy: RetryPolicy, dead_letters: DeadLetters) -> None:
        self.policy = policy
        self.dead_letters = dead_letters

    @property
    def actor_options(self) -> set[str]:
        return {"throws"}

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            return
        retries = int(message.options.get("retries", 0))
        delay = self.policy.delay_ms(exception, retries)
        if delay is None:
            message.fail()
            self.dead_letters.record(message, exception, retries)
            return
        message.options["retries"] = retries + 1
        logger.info("retrying message %s in %d ms: %s", message.message_id, delay, type(exception).__name__)
        _enqueue_until_stored(broker, cast("dramatiq.Message[Any]", message), delay)


def _enqueue_until_stored(broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int) -> None:
    """Put the retry on the broker, trying again while the broker is unreachable.

    The worker acknowledges the message once this hook returns, so a retry that was never stored
    would lose it; Dramatiq's worker keeps trying its acks the same way.
    """
    while True:
        try:
            broker.enqueue(message, delay=delay)
            return
        except (BrokerConnectionError, redis.ConnectionError, redis.TimeoutError) as error:
            name = type(error).__name__  # never the error's text: it could name a host with a password
            logger.warning("could not requeue message %s (%s); trying again", message.message_id, name)
            time.sleep(REQUEUE_PAUSE_MS / 1000)
