"""Sending as a sender that does not check payloads (an older one, or one in another language) would.

The app's broker refuses an invalid payload at `send()`; the worker must refuse it too, which these
helpers let tests reach.
"""

from __future__ import annotations

import functools
from typing import Any

import dramatiq

from actors.sendcheck import ValidateOnSend

__all__ = ["send_unchecked", "unchecked_broker"]


@functools.cache
def unchecked_broker() -> dramatiq.Broker:
    """A broker like the app's (`actors.broker`), on the same queues, without the check at send."""
    from actors import state
    from actors.brokers import build_broker

    settings = state.settings()
    broker = build_broker(settings, settings.effective_redis_url())
    broker.middleware[:] = [m for m in broker.middleware if not isinstance(m, ValidateOnSend)]
    return broker


def send_unchecked(actor: dramatiq.Actor[Any, Any], **kwargs: Any) -> dramatiq.Message[Any]:
    """`actor.send(**kwargs)`, unchecked."""
    message: dramatiq.Message[Any] = unchecked_broker().enqueue(actor.message(**kwargs))
    return message
