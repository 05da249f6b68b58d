"""How many messages a queue holds, by state, whichever broker carries it (Redis or RabbitMQ)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import dq_name, xq_name

from actors.errors import MemsyncError
from kvstore import BrokerKeys

__all__ = ["QueueCounts", "UnsupportedBroker", "queue_counts"]


class UnsupportedBroker(MemsyncError):
    """Raised when messages are counted on a broker other than Dramatiq's Redis or RabbitMQ broker."""


@dataclass(frozen=True)
class QueueCounts:
    """The messages of one queue: waiting, delayed (retries), dead-lettered, and fetched but not acked.

    `in_flight` is None where the broker cannot tell (RabbitMQ: see `_rabbitmq_counts`).
    """

    queue: str
    ready: int
    delayed: int
    dead: int
    in_flight: int | None


def queue_counts(broker: dramatiq.Broker, queue_name: str) -> QueueCounts:
    """Count the messages of `queue_name` (its canonical name) on `broker`; reading creates nothing."""
    if isinstance(broker, RedisBroker):
        return _redis_counts(broker, queue_name)
    if _is_rabbitmq(broker):
        return _rabbitmq_counts(broker, queue_name)
    raise UnsupportedBroker(f"cannot count the messages of a {type(broker).__name__}")


def _redis_counts(broker: RedisBroker, queue: str) -> QueueCounts:
    """One transaction: a worker holds the delayed messages it fetched until they are due, so every
    delayed message is in the delay queue's hash; fetched ones stay in the queue's hash until acked.
    """
    keys = BrokerKeys(broker.namespace)
    pipe = broker.client.pipeline(transaction=True)
    pipe.llen(keys.queue(queue))
    pipe.hlen(keys.queue_messages(queue))
    pipe.hlen(keys.delay_messages(queue))
    pipe.zcard(keys.dead_queue(queue))
    ready, held, delayed, dead = (int(count) for count in pipe.execute())
    return QueueCounts(queue, ready, delayed, dead, in_flight=max(held - ready, 0))


def _is_rabbitmq(broker: dramatiq.Broker) -> bool:
    try:  # pika is an optional dependency of Dramatiq's
        from dramatiq.brokers.rabbitmq import RabbitmqBroker
    except ImportError:
        return False
    return isinstance(broker, RabbitmqBroker)


def _rabbitmq_counts(broker: Any, queue: str) -> QueueCounts:
    """Passive declarations, which create and change nothing.

    RabbitMQ counts only the messages no consumer holds: a worker's prefetched messages, and the
    delayed ones it holds until they are due, are in no count.
    """
    ready, delayed, dead = (_rabbitmq_ready(broker, name) for name in (queue, dq_name(queue), xq_name(queue)))
    return QueueCounts(queue, ready, delayed, dead, in_flight=None)


def _rabbitmq_ready(broker: Any, name: str) -> int:
    import pika
    from dramatiq.errors import ConnectionClosed

    try:
        declared = broker.channel.queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as error:
        del broker.channel  # RabbitMQ closes the channel of a failed declaration
        if error.reply_code == 404:  # never declared: nothing in it
            return 0
        raise ConnectionClosed(error) from None  # type: ignore[no-untyped-call]
    except pika.exceptions.AMQPError as error:  # unreachable, or refused us: as Dramatiq says it
        raise ConnectionClosed(error) from None  # type: ignore[no-untyped-call]
    return int(declared.method.message_count)
