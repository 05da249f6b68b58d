"""Which broker this test run uses, and what a test can see of RabbitMQ's queues.

The suite runs on Dramatiq's Redis broker; `tests/actors/test_rabbitmq.py` runs the actor tests and
the kill scenarios again in a pytest of their own, with `BROKER_URL` naming the RabbitMQ of this
machine and a queue name of their own.

RabbitMQ tells a client how many messages of a queue are ready and how many consumers it has (a
passive declaration), never which messages a consumer holds; the helpers here make do with that.
"""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlsplit

import pika
import pika.exceptions
import pytest
from dramatiq.common import dq_name, xq_name

__all__ = [
    "RABBITMQ_URL",
    "RabbitQueues",
    "on_rabbitmq",
    "rabbitmq_answers",
    "rabbitmq_holds_messages",
    "redis_broker_only",
]

#: The RabbitMQ of this machine and of CI; `MEMSYNC_TEST_RABBITMQ_URL` points elsewhere.
RABBITMQ_URL = os.environ.get("MEMSYNC_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def on_rabbitmq() -> bool:
    """Whether this test run's broker is RabbitMQ (`BROKER_URL` is `amqp://` or `amqps://`)."""
    return urlsplit(os.environ.get("BROKER_URL", "")).scheme in ("amqp", "amqps")


#: For a test of what only Dramatiq's Redis broker has (its keys, its heartbeats, its reconnects).
redis_broker_only = pytest.mark.skipif(on_rabbitmq(), reason="Dramatiq's Redis broker only")


def rabbitmq_answers(url: str = RABBITMQ_URL) -> bool:
    """Whether something accepts TCP connections at the RabbitMQ URL's host and port."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=2).close()
    except OSError:
        return False
    return True


class RabbitQueues:
    """A queue and its delay queue, seen through passive declarations on a connection of its own.

    A passive declaration neither creates nor changes a queue; one that does not exist counts as empty.
    """

    def __init__(self, queue: str, url: str | None = None) -> None:
        self.names = (queue, dq_name(queue))
        self.connection = pika.BlockingConnection(pika.URLParameters(url or os.environ["BROKER_URL"]))
        self.channel = self.connection.channel()

    def counts(self) -> tuple[int, int]:
        """How many messages are ready in the queue and its delay queue, and how many consumers they have."""
        counted = [self._declared(name) for name in self.names]
        return sum(ready for ready, _ in counted), sum(consumers for _, consumers in counted)

    def dead(self) -> int:
        """How many messages are in the dead-letter queue."""
        return self._declared(xq_name(self.names[0]))[0]

    def _declared(self, name: str) -> tuple[int, int]:
        try:
            declared = self.channel.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as error:
            self.channel = self.connection.channel()
            if error.reply_code != 404:
                raise
            return 0, 0
        return int(declared.method.message_count), int(declared.method.consumer_count)

    def ready_once_unconsumed(self, timeout_s: float = 30.0) -> int:
        """The ready count once no consumer is left (RabbitMQ has then put back every unacked message)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready, consumers = self.counts()
            if consumers == 0:
                return ready
            if time.monotonic() >= deadline:
                raise AssertionError(f"RabbitMQ still counts {consumers} consumers after {timeout_s:g} s")
            time.sleep(0.005)

    def delete(self) -> None:
        """Delete the queue, its delay queue and its dead-letter queue (RabbitMQ keeps them otherwise)."""
        for name in (*self.names, xq_name(self.names[0])):
            self.channel.queue_delete(name)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def rabbitmq_holds_messages(queue: str, settle_s: float = 0.5) -> bool:
    """Whether a message is left in `queue` or its delay queue.

    Exact once the queues have no consumer (RabbitMQ has then put back what was unacked), which is
    waited for up to `settle_s` (a killed worker's connection is dropped within milliseconds). While
    a worker still consumes, RabbitMQ shows only the ready messages, never the unacked ones.
    """
    queues = RabbitQueues(queue)
    deadline = time.monotonic() + settle_s
    try:
        ready, consumers = queues.counts()
        while consumers and time.monotonic() < deadline:
            time.sleep(0.01)
            ready, consumers = queues.counts()
        return ready > 0
    finally:
        queues.close()
