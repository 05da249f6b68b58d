"""Payloads are checked when they are sent, so an app gets a bad payload's error at once.

The worker checks them again (a message may come from an older sender, or from another language).
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from actors.errors import InvalidPayload, RefusedAtSend
from actors.payloads import BatchPayload, RollbackPayload, SyncPayload, parse
from kvstore import KVStoreError, canonical_json

__all__ = ["ValidateOnSend"]

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

    def before_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int) -> None:
        model = _PAYLOADS.get(message.actor_name)
        if model is None or message.options.get("retries"):  # a retry was checked when first sent
            return
        try:
            payload = parse(model, tuple(message.args), dict(message.kwargs))
            if isinstance(payload, SyncPayload):
                canonical_json(payload.value, self.max_value_bytes)
        except (InvalidPayload, KVStoreError) as error:
            raise RefusedAtSend(str(error)) from None
