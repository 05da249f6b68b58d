"""The Procfile's worker, run for real as a subprocess and fed by `send()` from this process.

What only a real worker process shows: messages applied end to end, a SIGKILLed worker's message
delivered again within 30 s, and a double SIGTERM (honcho, Heroku) letting the running message
finish instead of dropping it.
"""

from __future__ import annotations

import itertools
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from dramatiq.results import ResultMissing, ResultTimeout

import actors
from actors import state
from kvstore import Keys
from tests.support.brokers import on_rabbitmq, rabbitmq_holds_messages
from tests.support.embedding_server import EmbeddingServer
from tests.support.worker import (
    READY_LINE,
    group_members,
    running_worker,
    signal_group,
    wait_until,
)

#: Slow embeddings are the point of some tests here, so the worker must not time them out.
SLOW_EMBEDDINGS = {"MEMSYNC_EMBEDDING_TIMEOUT_MS": "20000"}
SHUTDOWN_TIMEOUT_S = 15
BOOT_TIMEOUT_S = 30.0
REDELIVERY_DEADLINE_S = 30.0

pytestmark = pytest.mark.usefixtures("empty_queues")


def sync(namespace: str, key: str, value: Any) -> Any:
    return actors.memory_sync.send(key=key, value=value, embed=True, namespace=namespace)


def result_of(message: Any, timeout_s: float) -> dict[str, Any]:
    result: dict[str, Any] = message.get_result(block=True, timeout=int(timeout_s * 1000))
    return result


def stored_result(message: Any) -> dict[str, Any] | None:
    """The result stored for `message`, without waiting; None when there is none."""
    try:
        result: dict[str, Any] = message.get_result()
    except ResultMissing:
        return None
    return result


def wait_for_a_request(server: EmbeddingServer) -> None:
    """Wait until the worker's embedding request has reached the server: it is mid-message."""
    wait_until(lambda: server.embedding_requests, BOOT_TIMEOUT_S, "the worker's embedding request")


def has_booted(log: Path, processes: int = 1) -> bool:
    return log.exists() and log.read_text(errors="replace").count(READY_LINE) >= processes


def still_in_broker(client: redis.Redis, message_id: str) -> bool:
    """Whether the broker still holds the message: queued, delayed, or fetched and never acked.

    The broker's hashes are keyed by a Redis id of each enqueue, so the message id is looked for inside.
    RabbitMQ names no message it holds, and counts unacked ones only once no worker consumes: there,
    any message left in this test's queue counts (see `rabbitmq_holds_messages`).
    """
    if on_rabbitmq():
        return rabbitmq_holds_messages(state.settings().queue)
    keys, queue = Keys(state.settings().prefix).broker_keys(), state.settings().queue
    held = [*client.hvals(keys.queue_messages(queue)), *client.hvals(keys.delay_messages(queue))]
    return any(json.loads(data)["message_id"] == message_id for data in held)


@pytest.mark.timeout(90)
def test_the_procfile_worker_applies_synced_memories(
    embedding_service: EmbeddingServer, redis_client: redis.Redis, namespace: str, worker_logs: Path
) -> None:
    values = {f"pref-{i}": f"the user likes colour number {i}" for i in range(3)}
    with running_worker(None, worker_logs / "worker.log"):
        messages = [sync(namespace, key, value) for key, value in values.items()]
        results = [result_of(message, 60) for message in messages]
        # A result is stored before its message is acked: wait for the acks before the worker is killed.
        for message in messages:
            wait_until(lambda: not still_in_broker(redis_client, message.message_id), 10, "an ack")  # noqa: B023

    assert [(r["status"], r["key"], r["version"]) for r in results] == [("success", key, 1) for key in values]
    store = state.runtime().store
    assert {key: store.get(key, namespace=namespace) for key in values} == values
    requests = embedding_service.embedding_requests  # concurrent syncs may share a request
    assert sum(request.inputs for request in requests) == len(values) >= len(requests)


@pytest.mark.timeout(120)
def test_a_killed_workers_message_is_delivered_again_within_30_seconds(
    embedding_service: EmbeddingServer, redis_client: redis.Redis, namespace: str, worker_logs: Path
) -> None:
    embedding_service.latency_ms = 4000
    message = sync(namespace, "slow", "a memory whose worker dies")
    with running_worker(SLOW_EMBEDDINGS, worker_logs / "killed.log") as worker:
        wait_for_a_request(embedding_service)
        signal_group(worker, signal.SIGKILL)
        killed_at = time.monotonic()
    embedding_service.latency_ms = 0

    with running_worker(SLOW_EMBEDDINGS, worker_logs / "fresh.log"):
        try:
            result = result_of(message, REDELIVERY_DEADLINE_S - (time.monotonic() - killed_at))
        except ResultTimeout:
            pytest.fail(f"the killed worker's message did not come back within {REDELIVERY_DEADLINE_S:g} s")
        redelivered_s = time.monotonic() - killed_at
        wait_until(lambda: not still_in_broker(redis_client, message.message_id), 10, "the ack")

    print(f"delivered again and applied {redelivered_s:.1f} s after the kill")
    assert redelivered_s < REDELIVERY_DEADLINE_S
    assert (result["status"], result["version"]) == ("success", 1)
    assert len(embedding_service.embedding_requests) == 2  # the killed attempt, then the one that applied
    assert state.runtime().store.history("slow", namespace=namespace) == []


@pytest.mark.timeout(90)
def test_a_double_sigterm_lets_the_running_message_finish(
    embedding_service: EmbeddingServer, redis_client: redis.Redis, namespace: str, worker_logs: Path
) -> None:
    embedding_service.latency_ms = 3000
    env = {**SLOW_EMBEDDINGS, "MEMSYNC_SHUTDOWN_TIMEOUT_MS": str(SHUTDOWN_TIMEOUT_S * 1000)}
    value = "a memory synced while the dyno stops"
    message = sync(namespace, "stopping", value)
    with running_worker(env, worker_logs / "worker.log") as worker:
        wait_for_a_request(embedding_service)
        signal_group(worker, signal.SIGTERM)
        time.sleep(0.3)
        signal_group(worker, signal.SIGTERM)
        stopped_at = time.monotonic()
        wait_until(lambda: not group_members(worker.pid), SHUTDOWN_TIMEOUT_S, "the worker to exit by itself")
        exited_s = time.monotonic() - stopped_at
        # No other worker ran: a result stored by now was stored by this worker before it exited.
        result = stored_result(message)

    print(f"the worker exited {exited_s:.1f} s after the second SIGTERM")
    assert result is not None, "the running message was dropped: no result once the worker had exited"
    assert (result["status"], result["version"]) == ("success", 1)
    assert worker.returncode == 0
    assert len(embedding_service.embedding_requests) == 1
    assert state.runtime().store.get("stopping", namespace=namespace) == value
    assert not still_in_broker(redis_client, message.message_id), "acked, so it will not run again"


@pytest.mark.timeout(90)
def test_a_second_worker_process_shares_the_load(
    embedding_service: EmbeddingServer, namespace: str, worker_logs: Path
) -> None:
    embedding_service.latency_ms = 1000
    one_thread = {**SLOW_EMBEDDINGS, "MEMSYNC_THREADS": "1"}
    first, second = worker_logs / "first.log", worker_logs / "second.log"
    with running_worker(one_thread, first), running_worker(one_thread, second):
        wait_until(lambda: has_booted(first) and has_booted(second), BOOT_TIMEOUT_S, "both workers to boot")
        messages = [sync(namespace, f"shared-{i}", f"memory number {i}") for i in range(4)]
        results = [result_of(message, 60) for message in messages]

    assert [r["status"] for r in results] == ["success"] * 4
    arrivals = sorted(request.arrived_s for request in embedding_service.embedding_requests)
    # One thread embeds one text at a time, 1 s each: requests less than 0.5 s apart came from both workers.
    assert min(later - earlier for earlier, later in itertools.pairwise(arrivals)) < 0.5
