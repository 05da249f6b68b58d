"""`memsync status` through the CLI entry point, on the test services: a health check and its counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from actors import memory_sync, state
from actors.cli import main
from actors.status import DRIFT_FOUND, NO_WORKER
from actors.transfer import workers_alive
from kvstore import KeyRef, Keys
from tests.actors.test_queues import RABBITMQ_URL, fetch, rabbitmq_answers
from tests.support.brokers import redis_broker_only
from tests.support.worker import PROJECT_ROOT, wait_until
from vectorstore.index import shard_name


def _status(capsys: pytest.CaptureFixture[str], *argv: str, code: int | None = None) -> dict[str, Any]:
    capsys.readouterr()
    exit_code = main(["status", *argv, "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert code is None or exit_code == code, printed
    return {**printed, "exit_code": exit_code}


@pytest.fixture
def no_worker() -> None:
    """No worker process of this test run is alive (a worker killed by an earlier test ages out)."""
    wait_until(lambda: workers_alive(state.runtime()) == 0, 30, "no live worker")


@pytest.fixture
def other_consumer(redis_url: str) -> Iterator[dramatiq.Consumer]:
    """A consumer of the memsync queue with a broker id of its own (not this process's broker's)."""
    namespace = state.runtime().keys.broker_namespace()
    broker = RedisBroker(url=redis_url, namespace=namespace, middleware=[])  # type: ignore[no-untyped-call]
    consumer = broker.consume(state.settings().queue, prefetch=1, timeout=200)
    yield consumer
    consumer.close()
    broker.close()


@redis_broker_only  # its other consumer is a Redis broker's
def test_status_counts_ready_delayed_and_dead_messages_sent_without_a_worker(
    capsys: pytest.CaptureFixture[str],
    empty_queues: None,
    no_worker: None,
    other_consumer: dramatiq.Consumer,
    namespace: str,
) -> None:
    before = _status(capsys, "--no-drift", "--namespace", namespace)
    for n in range(3):
        memory_sync.send(key=f"k{n}", value="v", namespace=namespace)
    memory_sync.send_with_options(
        kwargs={"key": "later", "value": "v", "namespace": namespace}, delay=3_600_000
    )
    fetched = fetch(other_consumer)
    other_consumer.nack(fetched)
    state.runtime().dead_letters.record(fetched, RuntimeError("refused"), 0)
    after = _status(capsys, "--no-drift", "--namespace", namespace, code=NO_WORKER)
    assert after["queues"] == [
        {"queue": state.settings().queue, "ready": 2, "delayed": 1, "dead": 1, "in_flight": 0}
    ]
    assert after["dead_letters"] == before["dead_letters"] + 1
    assert (after["workers_alive"], after["healthy"], after["drift"]) == (0, False, None)
    assert after["problems"] == ["no worker is alive"]
    state.broker().flush_all()  # no later worker runs these
    state.runtime().redis.hdel(state.runtime().keys.dead_letters(), fetched.message_id)


def test_status_says_in_text_that_no_worker_is_alive(
    capsys: pytest.CaptureFixture[str], no_worker: None, namespace: str
) -> None:
    capsys.readouterr()
    assert main(["status", "--namespace", namespace]) == NO_WORKER
    text = capsys.readouterr().out
    assert "workers alive: 0" in text and "unhealthy: no worker is alive" in text


def test_status_exits_zero_with_a_live_worker_and_no_drift(
    capsys: pytest.CaptureFixture[str], worker: dramatiq.Worker, namespace: str
) -> None:
    memories = state.runtime().memories
    memories.sync("pet", "a black cat", embed=True, namespace=namespace)
    memories.sync("city", "Lisbon", namespace=namespace)
    found = _status(capsys, "--namespace", namespace, code=0)
    assert found["workers_alive"] >= 1 and found["healthy"] and found["problems"] == []
    assert found["namespaces"] == [{"namespace": namespace, "memories": 2, "embedded": 1}]
    assert found["drift"] == []
    index = memories.index
    shard = shard_name(index.prefix, index.model, index.dimensions, index.shard_of(namespace), index.shards)
    assert {row["collection"]: row["vectors"] for row in found["collections"]}[shard] >= 1
    stored = [index.client.get_collection(row["collection"]).count() for row in found["collections"]]
    assert [row["vectors"] for row in found["collections"]] == stored and found["vectors"] == sum(stored)
    assert found["embedding"] == {
        "model": memories.embedder.model,
        "dimensions": memories.embedder.dimensions,
    }


def test_status_finds_a_deleted_vector_and_exits_non_zero_unless_told_to_skip_drift(
    capsys: pytest.CaptureFixture[str], worker: dramatiq.Worker, namespace: str
) -> None:
    memories = state.runtime().memories
    memories.sync("pet", "a black cat", embed=True, namespace=namespace)
    memories.index.delete([KeyRef(namespace, "pet")])
    found = _status(capsys, "--namespace", namespace, code=DRIFT_FOUND)
    assert found["drift"] == [{"namespace": namespace, "missing": 1, "stale": 0, "orphan": 0}]
    assert found["problems"] == [
        "the index has drifted from Redis in 1 namespace (memsync reconcile repairs it)"
    ]
    assert _status(capsys, "--namespace", namespace, "--no-drift", code=0)["drift"] is None


def test_status_loads_no_embedding_model_and_records_nothing(prefix: str, redis_client: redis.Redis) -> None:
    """With the offline model configured and no index recorded yet, status names it without loading it."""
    script = "\n".join(
        [
            "import sys",
            "from actors.cli import main",
            "main(['status', '--json'])",
            "print('onnxruntime' in sys.modules)",
        ]
    )
    env = {**os.environ, "MEMSYNC_EMBEDDER": "local", "MEMSYNC_PREFIX": prefix}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    *printed, loaded = done.stdout.strip().splitlines()
    assert loaded == "False", done.stderr
    assert json.loads("\n".join(printed))["embedding"] == {"model": "all-MiniLM-L6-v2", "dimensions": 384}
    assert not redis_client.exists(Keys(prefix).active_index())


def test_status_counts_a_rabbitmq_queue_when_the_broker_is_rabbitmq(prefix: str) -> None:
    if not rabbitmq_answers():
        pytest.skip("no RabbitMQ at 127.0.0.1:5672")
    queue = f"memsync-test-{uuid.uuid4().hex[:8]}"
    script = "\n".join(
        [
            "from dramatiq.common import dq_name, xq_name",
            "from actors import memory_sync, state",
            "from actors.cli import main",
            "memory_sync.send(key='k', value='v')",
            "q_name = memory_sync.queue_name",
            "code = main(['status', '--json', '--no-drift'])",
            "for name in (q_name, dq_name(q_name), xq_name(q_name)):",
            "    state.broker().channel.queue_delete(name)",
            "print(code)",
        ]
    )
    env = {**os.environ, "BROKER_URL": RABBITMQ_URL, "MEMSYNC_QUEUE": queue, "MEMSYNC_PREFIX": prefix}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    *printed, code = done.stdout.strip().splitlines()
    assert code == str(NO_WORKER), done.stderr
    found = json.loads("\n".join(printed))
    assert found["queues"] == [{"queue": queue, "ready": 1, "delayed": 0, "dead": 0, "in_flight": None}]
