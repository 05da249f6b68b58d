"""The actors through a real broker and an in-process worker: results, retries, dead letters."""

from __future__ import annotations

import re
import time
from typing import Any

import dramatiq
import pytest

import actors
from actors import memory_rollback, memory_sync, state
from actors.queues import queue_counts
from actors.sendcheck import ValidateOnSend
from kvstore import MemoryStore, MemsyncError
from tests.conftest import API_KEY
from tests.support.embedding_server import EmbeddingServer, mask_key
from tests.support.results import WAIT_MS, failure_of, result_of
from tests.support.unchecked import unchecked_broker


def _dead_letter_reason(message_id: str) -> str:
    letter = state.runtime().dead_letters.get(message_id)
    assert letter is not None, "the message was not dead-lettered"
    return letter.reason


def test_a_sync_returns_success_with_its_version(worker: dramatiq.Worker, namespace: str) -> None:
    message = memory_sync.send(key="user-42:prefs", value={"theme": "dark"}, embed=True, namespace=namespace)
    result = result_of(message)
    assert result == {**result, "status": "success", "key": "user-42:prefs", "version": 1}
    assert (result["namespace"], result["outcome"]) == (namespace, "applied")


def test_a_rollback_returns_rolled_back_and_restores_the_value(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore
) -> None:
    result_of(memory_sync.send(key="k", value="one", embed=True, namespace=namespace))
    result_of(memory_sync.send(key="k", value="two", embed=True, namespace=namespace))
    result = result_of(memory_rollback.send(key="k", namespace=namespace))
    assert (result["status"], result["version"]) == ("rolled_back", 3)
    assert store.get("k", namespace=namespace) == "one"
    assert [hit.value for hit in actors.search("one", namespace=namespace)] == ["one"]


def test_a_transient_embedding_failure_is_retried_until_applied(
    worker: dramatiq.Worker, namespace: str, embedding_service: EmbeddingServer
) -> None:
    embedding_service.fail_next(500, count=2)
    assert (
        result_of(memory_sync.send(key="k", value="v", embed=True, namespace=namespace))["status"]
        == "success"
    )
    assert [r.status for r in embedding_service.embedding_requests] == [500, 500, 200]


def test_retry_after_is_honoured_over_a_shorter_backoff(
    worker: dramatiq.Worker, namespace: str, embedding_service: EmbeddingServer
) -> None:
    embedding_service.fail_next(429, retry_after_s=1.5)
    assert (
        result_of(memory_sync.send(key="k", value="v", embed=True, namespace=namespace))["status"]
        == "success"
    )
    first, second = embedding_service.embedding_requests
    assert second.arrived_s - first.arrived_s >= 1.5  # the backoff alone would be 50 ms


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_a_permanent_failure_is_dead_lettered_once_with_its_reason_and_writes_nothing(
    worker: dramatiq.Worker,
    namespace: str,
    embedding_service: EmbeddingServer,
    store: MemoryStore,
    status: int,
) -> None:
    embedding_service.fail_next(status)
    message = memory_sync.send(key="k", value="v", embed=True, namespace=namespace)
    assert "EmbeddingRejected" in failure_of(message)
    assert f"answered {status}" in _dead_letter_reason(message.message_id)
    assert len(embedding_service.embedding_requests) == 1
    assert store.record("k", namespace=namespace) is None


def test_a_dead_letter_reason_never_holds_the_api_key(
    worker: dramatiq.Worker, namespace: str, embedding_service: EmbeddingServer
) -> None:
    embedding_service.fail_next(401, message=f"Incorrect API key provided: {API_KEY} ({mask_key(API_KEY)})")
    message = memory_sync.send(key="k", value="v", embed=True, namespace=namespace)
    failure, reason = failure_of(message), _dead_letter_reason(message.message_id)
    for text in (failure, reason):
        assert API_KEY not in text and mask_key(API_KEY) not in text


def test_a_sync_that_runs_out_of_retries_leaves_nothing_half_applied(
    worker: dramatiq.Worker, namespace: str, embedding_service: EmbeddingServer, store: MemoryStore
) -> None:
    result_of(memory_sync.send(key="k", value="a cat", embed=True, namespace=namespace))
    result_of(memory_sync.send(key="k", value="a dog", embed=True, namespace=namespace))
    embedding_service.clear_log()
    embedding_service.fail_next(500, count=10)  # the rollback cannot embed "a cat", before or after writing
    message = memory_rollback.send(key="k", namespace=namespace)
    failure_of(message)
    record = store.record("k", namespace=namespace)
    assert record is not None and (record.value, record.version) == ("a dog", 2)
    assert len(store.history("k", namespace=namespace)) == 1
    assert "answered 500" in _dead_letter_reason(message.message_id)
    assert len(embedding_service.embedding_requests) == 4  # the first attempt and 3 retries


INVALID_PAYLOADS = [
    ({"value": "v"}, "key: Field required"),
    ({"key": 42, "value": "v"}, "key: Input should be a valid string"),
    ({"key": "", "value": "v"}, "key is empty"),
    ({"key": "a\x01b", "value": "v"}, "control character"),
    ({"key": "{key}"}, "value: Field required"),
    ({"key": "{key}", "value": "x" * 1_100_000}, "limit is 1048576"),
    ({"key": "{key}", "value": float("nan")}, "NaN|nan"),
    ({"key": "{key}", "value": "v", "embed": "yes"}, "embed: Input should be a valid boolean"),
    ({"key": "{key}", "value": "v", "colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"key": "{key}", "value": "v", "namespace": "a:b"}, "namespace must be"),
]


def _named(payload: dict[str, Any], key: str, namespace: str) -> dict[str, Any]:
    """`payload` with its key placeholder filled, in `namespace` unless it names its own."""
    return {"namespace": namespace, **payload, **({"key": key} if payload.get("key") == "{key}" else {})}


@pytest.mark.parametrize(("payload", "problem"), INVALID_PAYLOADS)
def test_an_invalid_payload_is_refused_when_sent_and_nothing_is_queued(
    store: MemoryStore, namespace: str, payload: dict[str, Any], problem: str, empty_queues: None
) -> None:
    with pytest.raises(MemsyncError, match=problem):
        memory_sync.send(**_named(payload, "refused", namespace))
    assert queue_counts(actors.broker, memory_sync.queue_name).ready == 0
    assert store.keys(namespace=namespace) == []


@pytest.mark.parametrize(("payload", "problem"), INVALID_PAYLOADS)
def test_an_invalid_payload_from_a_sender_that_does_not_check_is_dead_lettered_at_once(
    worker: dramatiq.Worker,
    store: MemoryStore,
    namespace: str,
    payload: dict[str, Any],
    problem: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unchecked = [m for m in actors.broker.middleware if not isinstance(m, ValidateOnSend)]
    monkeypatch.setattr(actors.broker, "middleware", unchecked)  # as an older sender, or another language
    message = memory_sync.send(**_named(payload, "unchecked", namespace))
    failure_of(message)
    letter = state.runtime().dead_letters.get(message.message_id)
    assert letter is not None and letter.retries == 0
    assert re.search(problem, letter.reason), letter.reason
    assert store.keys(namespace=namespace) == []


def test_a_message_delivered_twice_is_applied_once(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore
) -> None:
    message = memory_sync.message(key="k", value="v", namespace=namespace)
    actors.broker.enqueue(message)
    result_of(message)
    actors.broker.enqueue(message)
    actors.broker.join(memory_sync.queue_name, timeout=WAIT_MS)
    assert result_of(message)["outcome"] in ("applied", "duplicate")
    record = store.record("k", namespace=namespace)
    assert record is not None and record.version == 1


def test_an_older_message_delivered_late_does_not_overwrite_a_newer_one(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore
) -> None:
    older = memory_sync.message(key="k", value="older", namespace=namespace)
    newer = memory_sync.message(key="k", value="newer", namespace=namespace)
    newer = newer.copy(message_timestamp=older.message_timestamp + 1000)
    actors.broker.enqueue(newer)
    result_of(newer)
    actors.broker.enqueue(older)
    assert result_of(older)["outcome"] == "stale"
    assert store.get("k", namespace=namespace) == "newer"


def test_a_dead_letter_is_replayed_once_its_cause_is_fixed(
    worker: dramatiq.Worker, namespace: str, embedding_service: EmbeddingServer, store: MemoryStore
) -> None:
    embedding_service.fail_next(400)
    message = memory_sync.send(key="k", value="v", embed=True, namespace=namespace)
    failure_of(message)
    dead_letters = state.runtime().dead_letters
    assert dead_letters.replay(actors.broker, [message.message_id]) == [message.message_id]
    deadline = time.monotonic() + WAIT_MS / 1000
    while store.get("k", namespace=namespace) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get("k", namespace=namespace) == "v"
    assert dead_letters.get(message.message_id) is None


def test_positional_arguments_follow_the_seed_order_key_value_embed(
    worker: dramatiq.Worker, store: MemoryStore
) -> None:
    key = f"positional-{time.time_ns()}"
    assert result_of(memory_sync.send(key, {"a": 1}, True))["status"] == "success"
    record = store.record(key)
    assert record is not None and (record.value, record.embed) == ({"a": 1}, True)


def test_an_invalid_delayed_message_from_a_sender_that_does_not_check_is_dead_lettered_when_due(
    worker: dramatiq.Worker, store: MemoryStore, namespace: str
) -> None:
    message = memory_sync.message(key="k", value="v", embed="yes", namespace=namespace)
    unchecked_broker().enqueue(message, delay=200)  # the worker puts it back on the queue once due
    failure_of(message)
    letter = state.runtime().dead_letters.get(message.message_id)
    assert letter is not None and "embed" in letter.reason
    assert store.keys(namespace=namespace) == []
