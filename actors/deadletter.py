"""Dead letters with their reasons: Dramatiq keeps neither the reason nor a way to requeue; this does."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import q_name
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from actors.errors import InvalidPayload
from actors.sendcheck import check_as_sent
from kvstore import BrokerKeys, Keys

__all__ = ["DeadLetter", "DeadLetters", "scrub"]

_REASON_LIMIT = 1000


@dataclass(frozen=True)
class DeadLetter:
    """A message that failed for good: what it was, why, and the message itself for a replay."""

    message_id: str
    actor: str
    queue: str
    key: str | None
    namespace: str | None
    reason: str
    error: str
    retries: int
    failed_at_ms: int
    message: dict[str, Any]


def scrub(text: str, secrets: Sequence[str]) -> str:
    """`text` with every secret replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class DeadLetters:
    """Reads and writes `{prefix}:dead`, a hash of message id -> dead letter (JSON)."""

    def __init__(self, client: redis.Redis, keys: Keys, *, secrets: Sequence[str] = ()) -> None:
        self.client = client
        self.keys = keys
        self.secrets = tuple(secrets)

    def record(
        self, message: dramatiq.MessageProxy | dramatiq.Message[Any], error: BaseException, retries: int
    ) -> None:
        """Keep why `message` failed for good; a failure to keep it is logged, never raised."""
        letter = DeadLetter(
            message_id=message.message_id,
            actor=message.actor_name,
            queue=message.queue_name,
            key=_argument(message, "key"),
            namespace=_argument(message, "namespace"),
            reason=scrub(f"{type(error).__name__}: {error}", self.secrets)[:_REASON_LIMIT],
            error=type(error).__name__,
            retries=retries,
            failed_at_ms=time.time_ns() // 1_000_000,
            message=dict(message.asdict()),
        )
        try:
            # vars(), not asdict(): that copies the message recursively, and a deeply nested value
            # (which is why some messages are dead-lettered) raises RecursionError.
            self.client.hset(self.keys.dead_letters(), letter.message_id, json.dumps(vars(letter)))
        except redis.RedisError:
            logging.getLogger("memsync.deadletters").warning(
                "could not record the dead letter %s", letter.message_id
            )

    def all(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        entries = self.client.hvals(self.keys.dead_letters())
        letters = [DeadLetter(**json.loads(entry)) for entry in entries]
        return sorted(letters, key=lambda letter: letter.failed_at_ms)

    def get(self, message_id: str) -> DeadLetter | None:
        entry = self.client.hget(self.keys.dead_letters(), message_id)
        return None if entry is None else DeadLetter(**json.loads(entry))

    def replay(
        self,
        broker: dramatiq.Broker,
        message_ids: Sequence[str],
        on_refused: Callable[[str, str], None] | None = None,
    ) -> list[str]:
        """Put dead-lettered messages back on their queues with their retries reset; returns the ids replayed.

        The message keeps its id and send time, so a replay never overwrites a newer write. Its
        stored failure is removed first, so that waiting for its result waits for the replay. A
        letter whose payload the broker refuses at send (it would fail again) stays, and
        `on_refused(message_id, reason)` hears of it; the others are replayed all the same.
        """
        replayed = []
        for message_id in message_ids:
            letter = self.get(message_id)
            if letter is None:
                continue
            message = _fresh(letter.message)
            try:
                check_as_sent(broker, message)
            except InvalidPayload as refused:
                if on_refused is not None:
                    on_refused(message_id, scrub(str(refused), self.secrets))
                continue
            _forget_result(broker, message)
            broker.enqueue(message)
            self._forget(letter, broker)
            replayed.append(message_id)
        return replayed

    def _forget(self, letter: DeadLetter, broker: dramatiq.Broker) -> None:
        """Drop the letter, and Dramatiq's copy of it on a Redis broker (which may be another Redis).

        RabbitMQ cannot take one message out of a queue: its copy in `<queue>.XQ` stays until
        Dramatiq's dead-message TTL (7 days by default) expires it.
        """
        self.client.hdel(self.keys.dead_letters(), letter.message_id)
        redis_id = str(letter.message.get("options", {}).get("redis_message_id", ""))
        if redis_id and isinstance(broker, RedisBroker):
            broker_keys = BrokerKeys(broker.namespace)
            pipe = broker.client.pipeline()
            pipe.zrem(broker_keys.dead_queue(letter.queue), redis_id)
            pipe.hdel(broker_keys.dead_messages(letter.queue), redis_id)
            pipe.execute()


def _forget_result(broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> None:
    for middleware in broker.middleware:
        if isinstance(middleware, Results) and isinstance(middleware.backend, RedisBackend):
            backend = middleware.backend
            backend.client.delete(backend.build_message_key(message))


def _argument(message: dramatiq.MessageProxy | dramatiq.Message[Any], name: str) -> str | None:
    """A string argument of the message by name; the key may also come first, positionally."""
    value = message.kwargs.get(name)
    if value is None and name == "key" and message.args:
        value = message.args[0]
    return value if isinstance(value, str) else None


def _fresh(stored: dict[str, Any]) -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name=q_name(str(stored["queue_name"])),  # a retry was stored under its delay queue
        actor_name=stored["actor_name"],
        args=tuple(stored["args"]),
        kwargs=stored["kwargs"],
        options={},
        message_id=stored["message_id"],
        message_timestamp=stored["message_timestamp"],
    )
