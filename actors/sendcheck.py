"""Payloads are checked when they are sent, so an app gets a bad payload's error at once.

The worker checks them again (a message may come from an older sender, or from another language).
"""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from actors.errors import InvalidPayload, RefusedAtSend
from actors.payloads import BatchPayload, RollbackPayload, SyncPayload, parse
from kvstore import KVStoreError, canonical_json

__all__ = ["ValidateOnSend", "check_as_sent"]

#: Marks Dramatiq's consumer threads, which put due delayed messages back on their queues.
_thread = threading.local()

_PAYLOADS: dict[str, type[SyncPayload] | type[RollbackPayload] | type[BatchPayload]] = {
    "memory_sync": SyncPayload,
    "memory_rollback": RollbackPayload,
    "memory_sync_batch": BatchPayload,
}


class ValidateOnSend(Middleware):
    """Makes `send()` raise for a memsync message whose payload is invalid; nothing is sent.

    It raises RefusedAtSend (an InvalidPayload) naming what the worker would fail the message
    with. A batch is checked as a whole here (its
    shape and size); each of its items is checked by the worker, where one bad item fails alone.
    """

    def __init__(self, max_value_bytes: int) -> None:
        self.max_value_bytes = max_value_bytes

    def after_consumer_thread_boot(self, broker: dramatiq.Broker, thread: Any) -> None:
        _thread.consumer = True  # runs in the consumer thread: what it enqueues was sent before

    def before_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None
    ) -> None:
        model = _PAYLOADS.get(message.actor_name)
        if model is None or _sent_before(message):
            return
        try:
            payload = parse(model, tuple(message.args), dict(message.kwargs))
            if isinstance(payload, SyncPayload):
                canonical_json(payload.value, self.max_value_bytes)
        except (InvalidPayload, KVStoreError) as error:
            raise RefusedAtSend(str(error)) from None


def _sent_before(message: dramatiq.Message[Any]) -> bool:
    """Whether this enqueue puts back a message that was sent already: a retry, or a delayed one now due.

    Those run in a worker (a retry from the retry middleware, a due message from the consumer that
    held it), where a refusal would strand the message rather than tell a sender: the actor refuses
    it instead, and it is dead-lettered.
    """
    return bool(message.options.get("retries")) or getattr(_thread, "consumer", False)


def check_as_sent(broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> None:
    """Raise RefusedAtSend if `broker` would refuse `message` at send; nothing is sent."""
    for middleware in broker.middleware:
        if isinstance(middleware, ValidateOnSend):
            middleware.before_enqueue(broker, message, None)
