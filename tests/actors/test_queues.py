"""Message counts per queue, read from a real Redis broker and a real RabbitMQ, as `status` shows them."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import pika
import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker

from actors.queues import QueueCounts, UnsupportedBroker, queue_counts
from tests.support.worker import wait_until

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def rabbitmq_answers() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        return False
    return True


def _message(queue: str, n: int) -> dramatiq.Message[Any]:
    return dramatiq.Message(queue_name=queue, actor_name="probe", args=(n,), kwargs={}, options={})


def fetch(consumer: dramatiq.Consumer) -> dramatiq.MessageProxy:
    """The next message the consumer gets, waiting up to 10 s for one."""
    message = wait_until(lambda: next(consumer), 10, "a message")
    assert message is not None
    return message


def _fill(broker: dramatiq.Broker, queue: str) -> dramatiq.Consumer:
    """Three messages and two delayed ones; a consumer dead-letters one and holds one (it is returned)."""
    broker.declare_queue(queue)
    for n in range(3):
        broker.enqueue(_message(queue, n))
    for n in range(2):
        broker.enqueue(_message(queue, 10 + n), delay=3_600_000)
    consumer = broker.consume(queue, prefetch=1, timeout=200)
    consumer.nack(fetch(consumer))
    fetch(consumer)  # and never acked
    return consumer


@pytest.fixture
def redis_broker(redis_url: str, prefix: str) -> Iterator[RedisBroker]:
    broker = RedisBroker(url=redis_url, namespace=f"{prefix}-dramatiq", middleware=[])  # type: ignore[no-untyped-call]
    yield broker
    broker.flush_all()
    broker.close()


@pytest.fixture
def rabbitmq_broker() -> Iterator[RabbitmqBroker]:
    if not rabbitmq_answers():
        pytest.skip("no RabbitMQ at 127.0.0.1:5672")
    broker = RabbitmqBroker(url=RABBITMQ_URL, middleware=[])
    yield broker
    for queue in broker.get_declared_queues():
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            broker.channel.queue_delete(name)
    broker.close()


def test_a_redis_queue_counts_ready_delayed_dead_and_fetched_messages_apart(
    redis_broker: RedisBroker,
) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    consumer = _fill(redis_broker, queue)
    assert queue_counts(redis_broker, queue) == QueueCounts(queue, ready=1, delayed=2, dead=1, in_flight=1)
    consumer.close()


def test_a_redis_queue_never_used_counts_nothing(redis_broker: RedisBroker) -> None:
    assert queue_counts(redis_broker, "never-used") == QueueCounts("never-used", 0, 0, 0, 0)


def test_a_rabbitmq_queue_counts_ready_delayed_and_dead_messages(rabbitmq_broker: RabbitmqBroker) -> None:
    queue = f"memsync-test-{uuid.uuid4().hex[:8]}"
    consumer = _fill(rabbitmq_broker, queue)
    expected = QueueCounts(queue, ready=1, delayed=2, dead=1, in_flight=None)
    assert wait_until(lambda: queue_counts(rabbitmq_broker, queue) == expected, 10, "the dead letter's count")
    consumer.close()


def test_a_rabbitmq_queue_never_declared_counts_nothing_and_is_not_created(
    rabbitmq_broker: RabbitmqBroker,
) -> None:
    queue = f"memsync-test-{uuid.uuid4().hex[:8]}"
    assert queue_counts(rabbitmq_broker, queue) == QueueCounts(queue, 0, 0, 0, None)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        rabbitmq_broker.channel.queue_declare(queue, passive=True)
    del rabbitmq_broker.channel


def test_another_broker_is_refused_with_its_name() -> None:
    with pytest.raises(UnsupportedBroker, match="StubBroker"):
        queue_counts(StubBroker(), "memsync")
