"""Where retries live, once: Dramatiq's `Retries` middleware, with what memsync adds to it.

The options are Dramatiq's, per actor and per message (`send_with_options`): `max_retries`,
`min_backoff`, `max_backoff` (milliseconds), `retry_when`, `throws`, `on_retry_exhausted`, and
`Retry(delay=...)` for an explicit delay. memsync adds: its own errors are classified (a permanent
one is never retried), a server's Retry-After is honoured, a final failure is dead-lettered with its
reason, and a retry is put back on the broker even while the broker is unreachable. The backoff
doubles from `min_backoff` with Dramatiq's jitter (up to twice as long), so messages that failed
together in an outage do not all come back at the same instant.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import dramatiq
import redis
from dramatiq.common import compute_backoff
from dramatiq.errors import BrokerConnectionError, Retry
from dramatiq.middleware import Retries

from actors.deadletter import DeadLetters
from actors.errors import is_permanent
from actors.logs import attempt, describe, redacted
from kvstore.errors import MemsyncError
from vectorstore.errors import EmbeddingUnavailable

__all__ = ["MAX_RETRY_AFTER_MS", "RetryPolicy", "Retrying", "policy_for"]

#: The longest Retry-After honoured; a server asking for more is retried after this.
MAX_RETRY_AFTER_MS = 3_600_000
#: How long to wait before trying again to put a retry on an unreachable broker.
REQUEUE_PAUSE_MS = 1000

logger = logging.getLogger("memsync.retry")

RetryWhen = Callable[[int, BaseException], bool]


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry and after how long; Dramatiq's options of one actor or message, resolved."""

    max_retries: int | None = 3
    min_backoff_ms: int = 500
    max_backoff_ms: int = 30_000
    retry_when: RetryWhen | None = None
    throws: tuple[type[BaseException], ...] = ()
    jitter: bool = True

    def delay_ms(self, error: BaseException, retries: int) -> int | None:
        """How long to wait before the next attempt, or None when the failure is final.

        `retries` is how many retries have happened already. As in Dramatiq, `retry_when` (when set)
        decides instead of `max_retries`. A server's Retry-After wins when it asks for more.
        """
        if self.is_final(error, retries):
            return None
        if isinstance(error, Retry) and error.delay is not None:
            return int(error.delay)
        backoff = self._backoff_ms(retries)
        asked = error.retry_after_ms if isinstance(error, EmbeddingUnavailable) else None
        return max(backoff, min(asked or 0, MAX_RETRY_AFTER_MS))

    def is_final(self, error: BaseException, retries: int) -> bool:
        """Whether a failure after `retries` retries is the last: no retry comes."""
        if is_permanent(error) or (self.throws and isinstance(error, self.throws)):
            return True
        if self.retry_when is not None:
            return not self.retry_when(retries, error)
        return self.max_retries is not None and retries >= self.max_retries

    def _backoff_ms(self, retries: int) -> int:
        if not self.jitter:
            return min(self.min_backoff_ms * (1 << min(retries, 32)), self.max_backoff_ms)
        _, backoff = compute_backoff(retries, factor=self.min_backoff_ms, max_backoff=self.max_backoff_ms)
        return int(backoff)

    def with_options(self, *layers: Mapping[str, Any]) -> RetryPolicy:
        """This policy with Dramatiq's options applied; a later layer (the message's) wins."""
        changes: dict[str, Any] = {}
        for options in layers:
            for option, field in _FIELDS.items():
                if options.get(option) is not None:
                    changes[field] = options[option]
        if isinstance(changes.get("throws"), type):
            changes["throws"] = (changes["throws"],)
        return dataclasses.replace(self, **changes)


#: Dramatiq's option names, and the policy's field for each.
_FIELDS = {
    "max_retries": "max_retries",
    "min_backoff": "min_backoff_ms",
    "max_backoff": "max_backoff_ms",
    "retry_when": "retry_when",
    "throws": "throws",
}


def policy_for(
    broker: dramatiq.Broker, message: dramatiq.Message[Any] | dramatiq.MessageProxy
) -> RetryPolicy:
    """The policy that decides for `message`: the broker's, then its actor's options, then its own."""
    base = next((m.policy for m in broker.middleware if isinstance(m, Retrying)), RetryPolicy())
    actor = broker.get_actor(message.actor_name)
    return base.with_options(actor.options, message.options)


class Retrying(Retries):
    """Dramatiq's Retries with memsync's classification, Retry-After, dead letters and a patient requeue."""

    def __init__(self, policy: RetryPolicy, dead_letters: DeadLetters) -> None:
        super().__init__(
            max_retries=policy.max_retries if policy.max_retries is not None else 0,
            min_backoff=policy.min_backoff_ms,
            max_backoff=policy.max_backoff_ms,
            retry_when=policy.retry_when,
        )
        self.policy = policy
        self.dead_letters = dead_letters

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
        policy = policy_for(broker, message)
        delay = policy.delay_ms(exception, retries)
        error = type(exception).__name__  # never the error's text: it may hold a value or a host
        if not isinstance(exception, MemsyncError | Retry):  # a bug, not a failure memsync knows
            frames = "".join(traceback.format_tb(exception.__traceback__))  # code lines only, no values
            logger.error("%s raised %s (a bug?), at:\n%s", redacted(message), error, frames.rstrip())
        if delay is None:
            logger.error(describe(message, attempt=attempt(message), outcome="failed", error=error))
            self._give_up(broker, message, exception, policy)
            return
        line = describe(message, attempt=attempt(message), outcome="retrying", error=error, delay_ms=delay)
        logger.warning(line)
        message.options["retries"] = retries + 1
        message.options["requeue_timestamp"] = int(time.time() * 1000)
        _enqueue_until_stored(broker, cast("dramatiq.Message[Any]", message), delay)

    def _give_up(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        error: BaseException,
        policy: RetryPolicy,
    ) -> None:
        """Fail the message for good, keep it as a dead letter and, when retries ran out, tell its target."""
        retries = int(message.options.get("retries", 0))
        message.fail()
        self.dead_letters.record(message, error, retries)
        actor = broker.get_actor(message.actor_name)
        target = message.options.get("on_retry_exhausted") or actor.options.get("on_retry_exhausted")
        exhausted = not (is_permanent(error) or isinstance(error, policy.throws))
        if target and exhausted:
            broker.get_actor(target).send(
                message.asdict(), {"retries": retries, "max_retries": policy.max_retries}
            )


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
