"""`BROKER_URL`: RabbitMQ, or a Redis of the broker's own, while the store and results stay on `REDIS_URL`.

Most tests here build a broker of their own from the settings. The ones marked `rabbitmq_pass` need
the actors on RabbitMQ: they run in the RabbitMQ pass (tests/reliability/test_on_rabbitmq.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from actors import memory_sync, state
from actors.brokers import build_broker, secrets_of
from actors.deadletter import DeadLetters
from actors.lifecycle import Heartbeat
from actors.liveness import WorkerHeartbeat
from kvstore import BrokerKeys, Keys
from settings import Settings
from tests.support.brokers import RABBITMQ_URL, RabbitQueues, on_rabbitmq, rabbitmq_answers
from tests.support.embedding_server import EmbeddingServer
from tests.support.results import failure_of
from tests.support.services import free_port
from tests.support.worker import wait_until

rabbitmq_pass = pytest.mark.skipif(
    not on_rabbitmq(), reason="runs in the RabbitMQ pass (tests/reliability/test_on_rabbitmq.py)"
)


def _probe(queue: str) -> dramatiq.Message[object]:
    return dramatiq.Message(queue_name=queue, actor_name="probe", args=(), kwargs={}, options={})


def _settings(prefix: str, broker_url: str) -> Settings:
    return state.settings().model_copy(update={"prefix": prefix, "broker_url": broker_url})


@pytest.fixture
def rabbitmq_url() -> str:
    if not rabbitmq_answers():
        pytest.skip(f"no RabbitMQ answers at {urlsplit(RABBITMQ_URL).hostname}:{urlsplit(RABBITMQ_URL).port}")
    return RABBITMQ_URL


@pytest.fixture
def own_queue(rabbitmq_url: str) -> Iterator[str]:
    """A RabbitMQ queue name of this test's own; the queue and its delay and dead-letter queues go after."""
    queue = f"mstest-{uuid.uuid4().hex[:12]}"
    yield queue
    queues = RabbitQueues(queue, rabbitmq_url)
    queues.delete()
    queues.close()


@pytest.fixture
def broker_redis_url(redis_url: str, prefix: str) -> Iterator[str]:
    """The test Redis's database 1, a broker's Redis apart from the store's; emptied of this test's keys."""
    url = urlunsplit(urlsplit(redis_url)._replace(path="/1"))
    yield url
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)
    client.close()


def test_an_amqp_broker_url_builds_a_rabbitmq_broker_whose_sends_reach_rabbitmq(
    prefix: str, rabbitmq_url: str, own_queue: str
) -> None:
    broker = build_broker(_settings(prefix, rabbitmq_url), state.runtime().redis_url)
    try:
        broker.enqueue(_probe(own_queue))
        queues = RabbitQueues(own_queue, rabbitmq_url)
        assert queues.counts() == (1, 0)  # confirmed on send: no wait
        queues.close()
    finally:
        broker.close()
    kinds = {type(middleware) for middleware in broker.middleware}
    assert WorkerHeartbeat in kinds and Heartbeat not in kinds  # Dramatiq's Redis heartbeat has no part


def test_a_redis_broker_url_puts_the_queues_there_and_the_store_keys_stay_on_redis_url(
    prefix: str, redis_client: redis.Redis, broker_redis_url: str
) -> None:
    broker = build_broker(_settings(prefix, broker_redis_url), state.runtime().redis_url)
    assert isinstance(broker, RedisBroker)
    broker_client = redis.Redis.from_url(broker_redis_url)
    queue_keys = BrokerKeys(Keys(prefix).broker_namespace())
    broker.enqueue(_probe("probes"))
    assert broker_client.hlen(queue_keys.queue_messages("probes")) == 1
    assert redis_client.hlen(queue_keys.queue_messages("probes")) == 0
    broker_client.close()


def test_a_replay_takes_dramatiqs_copy_out_of_the_dead_letter_queue_on_the_brokers_own_redis(
    prefix: str, redis_client: redis.Redis, broker_redis_url: str
) -> None:
    broker = build_broker(_settings(prefix, broker_redis_url), state.runtime().redis_url)
    assert isinstance(broker, RedisBroker)
    dead_letters = DeadLetters(redis_client, Keys(prefix))
    xqueue = BrokerKeys(broker.namespace).dead_queue("probes")
    broker.enqueue(_probe("probes"))
    consumer = broker.consume("probes", prefetch=1, timeout=100)
    fetched = wait_until(lambda: next(consumer), 10, "the probe")
    assert fetched is not None
    consumer.nack(fetched)
    consumer.close()
    dead_letters.record(fetched, RuntimeError("refused"), 0)
    assert broker.client.zcard(xqueue) == 1
    assert dead_letters.replay(broker, [fetched.message_id]) == [fetched.message_id]
    assert broker.client.zcard(xqueue) == 0
    assert dead_letters.get(fetched.message_id) is None


def test_the_broker_urls_password_is_kept_out_of_logs_and_reasons(prefix: str) -> None:
    settings = _settings(prefix, "amqp://memsync:broker-secret-77@rabbit.internal:5672/%2F")
    assert "broker-secret-77" in secrets_of(settings, "redis://127.0.0.1:6379/0")


@rabbitmq_pass
def test_a_message_that_fails_for_good_is_in_rabbitmqs_dead_letter_queue_and_in_memsyncs(
    worker: dramatiq.Worker, namespace: str, embedding_service: EmbeddingServer
) -> None:
    queues = RabbitQueues(state.settings().queue)
    try:
        before = queues.dead()
        embedding_service.fail_next(400, message="this input is refused")
        message = memory_sync.send(key="k", value="v", embed=True, namespace=namespace)
        failure_of(message)
        wait_until(lambda: queues.dead() == before + 1, 10, "the nack to reach the dead-letter queue")
    finally:
        queues.close()
    letter = state.runtime().dead_letters.get(message.message_id)
    assert letter is not None and "this input is refused" in letter.reason


def test_a_command_that_cannot_reach_the_broker_says_so_in_one_line_without_the_password(
    prefix: str, redis_client: redis.Redis
) -> None:
    message = _probe("memsync")
    DeadLetters(redis_client, Keys(prefix)).record(message, RuntimeError("refused"), 0)
    url = f"amqp://memsync:broker-secret-77@127.0.0.1:{free_port()}/%2F"
    env = {**os.environ, "BROKER_URL": url, "MEMSYNC_PREFIX": prefix}
    command = [sys.executable, "-c", "import sys; from actors.cli import main; sys.exit(main())"]
    done = subprocess.run(
        [*command, "dlq", "replay", "--all"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "error: the broker is unreachable (ConnectionClosed); is BROKER_URL right?\n"
    status = subprocess.run(
        [*command, "status", "--no-drift"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert (status.returncode, status.stdout) == (1, "")
    assert status.stderr == "error: the broker is unreachable (ConnectionClosed); is BROKER_URL right?\n"
