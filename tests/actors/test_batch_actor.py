"""The batch actor through a real broker and an in-process worker: a result per item, retries, redelivery."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import actors
from actors import memory_sync_batch, state
from actors.errors import RefusedAtSend
from actors.payloads import MAX_BATCH_ITEMS
from actors.sendcheck import ValidateOnSend
from kvstore import MemoryStore
from tests.support.embedding_server import EmbeddingServer
from tests.support.results import WAIT_MS, failure_of, result_of
from tests.support.services import start_chroma
from vectorstore import VectorIndex, chroma_client

NO_FAILURES = {"applied": 0, "unchanged": 0, "duplicate": 0, "stale": 0, "failed": 0}


def _mixed_items(namespace: str) -> list[dict[str, Any]]:
    """Three embedded items and two plain ones, interleaved."""
    return [
        {"key": "pet-0", "value": "the user has a cat", "embed": True, "namespace": namespace},
        {"key": "prefs", "value": {"theme": "dark"}, "namespace": namespace},
        {"key": "pet-1", "value": "the user has a dog", "embed": True, "namespace": namespace},
        {"key": "lang", "value": "en", "namespace": namespace},
        {"key": "pet-2", "value": "the user has a parrot", "embed": True, "namespace": namespace},
    ]


@pytest.fixture
def chroma_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The workers' index on a `chroma run` of this test's own, stopped: every index step fails."""
    own = start_chroma(tmp_path / "chroma")
    memories = state.runtime().memories
    live = memories.index
    index = VectorIndex(
        chroma_client(own.url), model=live.model, dimensions=live.dimensions, prefix=live.prefix
    )
    own.stop()
    monkeypatch.setattr(memories, "index", index)
    yield


def _summary(results: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["status"], r["key"], r.get("version"), r.get("outcome")) for r in results]


def test_a_batch_returns_a_result_per_item_in_input_order_with_counts(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore, embedding_service: EmbeddingServer
) -> None:
    items = _mixed_items(namespace)
    answer = result_of(memory_sync_batch.send(items=items))

    assert answer["status"] == "success"
    assert _summary(answer["results"]) == [("success", item["key"], 1, "applied") for item in items]
    assert {r["namespace"] for r in answer["results"]} == {namespace}
    assert answer["counts"] == {**NO_FAILURES, "applied": 5}
    assert [r.inputs for r in embedding_service.embedding_requests] == [3]
    assert store.get("prefs", namespace=namespace) == {"theme": "dark"}
    assert [hit.key for hit in actors.search("parrot", k=1, namespace=namespace)] == ["pet-2"]


def test_an_invalid_item_fails_alone_in_the_results(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore
) -> None:
    good = {"key": "good", "value": "the user has a cat", "embed": True, "namespace": namespace}
    items: list[Any] = [
        good,
        {"key": "", "value": "v", "namespace": namespace},
        {"key": "colour", "value": "v", "colour": "red", "namespace": namespace},
        "not an object",
        {"key": "blank", "value": "", "embed": True, "namespace": namespace},
        {"key": "plain", "value": [1, 2], "namespace": namespace},
    ]
    message = memory_sync_batch.send(items=items)
    answer = result_of(message)

    results = answer["results"]
    assert [r["status"] for r in results] == ["success", "failed", "failed", "failed", "failed", "success"]
    assert "key is empty" in results[1]["error"]
    assert "colour: Extra inputs are not permitted" in results[2]["error"]
    assert "must be an object, not str" in results[3]["error"]
    assert "nothing to embed" in results[4]["error"]
    assert (results[4]["key"], results[4]["namespace"]) == ("blank", namespace)
    assert answer["counts"] == {**NO_FAILURES, "applied": 2, "failed": 4}
    assert store.keys(namespace=namespace) == ["good", "plain"]
    assert state.runtime().dead_letters.get(message.message_id) is None


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"items": "over-long"}, rf"items: List should have at most {MAX_BATCH_ITEMS} items"),
        ({"items": {"key": "k", "value": "v"}}, r"items: Input should be a valid list"),
        ({"items": "k"}, r"items: Input should be a valid list"),
        ({"items": []}, r"items: List should have at least 1 item"),
        ({}, r"items: Field required"),
        ({"items": [{"key": "k", "value": "v"}], "skip_unchanged": "yes"}, r"skip_unchanged: .*boolean"),
    ],
    ids=["over-long", "an-object", "a-string", "empty", "missing", "bad-option"],
)
def test_a_batch_that_is_not_a_list_of_at_most_the_limit_is_refused_whole_and_writes_nothing(
    worker: dramatiq.Worker,
    namespace: str,
    store: MemoryStore,
    payload: dict[str, Any],
    problem: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if payload.get("items") == "over-long":
        items = [{"key": f"k-{n}", "value": n, "namespace": namespace} for n in range(MAX_BATCH_ITEMS + 1)]
        payload = {"items": items}
    with pytest.raises(RefusedAtSend, match=problem):  # the app hears of it at once
        memory_sync_batch.send(**payload)

    # A sender that does not check (an older one, or another language): the worker refuses it too.
    unchecked = [m for m in state.broker().middleware if not isinstance(m, ValidateOnSend)]
    monkeypatch.setattr(state.broker(), "middleware", unchecked)
    message = memory_sync_batch.send(**payload)
    assert "InvalidPayload" in failure_of(message)
    letter = state.runtime().dead_letters.get(message.message_id)
    assert letter is not None and letter.retries == 0
    assert re.search(problem, letter.reason), letter.reason
    assert store.keys(namespace=namespace) == []
    assert store.record("k") is None


def test_a_batch_of_exactly_the_limit_is_accepted(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore
) -> None:
    items = [{"key": f"k-{n}", "value": n, "namespace": namespace} for n in range(MAX_BATCH_ITEMS)]
    answer = result_of(memory_sync_batch.send(items=items))
    assert answer["counts"] == {**NO_FAILURES, "applied": MAX_BATCH_ITEMS}
    assert len(store.keys(namespace=namespace)) == MAX_BATCH_ITEMS


def test_a_transient_embedding_failure_is_retried_and_every_item_is_applied_exactly_once(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore, embedding_service: EmbeddingServer
) -> None:
    embedding_service.fail_next(503, count=1)
    items = _mixed_items(namespace)
    message = memory_sync_batch.send(items=items)
    answer = result_of(message)

    # The plain items were applied by the first attempt and not run again: a second run would
    # have answered "duplicate".
    assert _summary(answer["results"]) == [("success", item["key"], 1, "applied") for item in items]
    assert answer["counts"] == {**NO_FAILURES, "applied": 5}
    requests = embedding_service.embedding_requests
    assert [(r.status, r.inputs) for r in requests] == [(503, 3), (200, 3)]
    for n, item in enumerate(items):
        record = store.record(item["key"], namespace=namespace)
        assert record is not None and record.version == 1
        assert record.msg_id == f"{message.message_id}:{n:05d}"
        assert store.history(item["key"], namespace=namespace) == []
    assert [hit.key for hit in actors.search("dog", k=1, namespace=namespace)] == ["pet-1"]


def test_an_embedding_refused_for_good_fails_the_embedded_items_alone(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore, embedding_service: EmbeddingServer
) -> None:
    embedding_service.fail_next(403)
    answer = result_of(memory_sync_batch.send(items=_mixed_items(namespace)))

    statuses = [(r["key"], r["status"]) for r in answer["results"]]
    assert statuses == [
        ("pet-0", "failed"), ("prefs", "success"), ("pet-1", "failed"), ("lang", "success"),
        ("pet-2", "failed"),
    ]  # fmt: skip
    assert all("EmbeddingRejected" in r["error"] for r in answer["results"] if r["status"] == "failed")
    assert answer["counts"] == {**NO_FAILURES, "applied": 2, "failed": 3}
    assert len(embedding_service.embedding_requests) == 1  # refused for good: not retried
    assert store.keys(namespace=namespace) == ["lang", "prefs"]


def test_a_batch_that_runs_out_of_retries_keeps_its_finished_items_and_nothing_of_the_others(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore, embedding_service: EmbeddingServer
) -> None:
    embedding_service.fail_next(503, count=10)
    message = memory_sync_batch.send(items=_mixed_items(namespace))

    assert "EmbeddingUnavailable" in failure_of(message)
    letter = state.runtime().dead_letters.get(message.message_id)
    assert letter is not None and "answered 503" in letter.reason
    assert len(embedding_service.embedding_requests) == 4  # the first attempt and 3 retries
    assert store.keys(namespace=namespace) == ["lang", "prefs"]
    for key in ("lang", "prefs"):
        assert store.history(key, namespace=namespace) == []


def test_a_batch_whose_index_step_fails_for_good_takes_back_the_writes_of_its_unfinished_items(
    worker: dramatiq.Worker,
    namespace: str,
    store: MemoryStore,
    embedding_service: EmbeddingServer,
    chroma_down: None,
) -> None:
    store.set("pet-1", "an older note", namespace=namespace)
    message = memory_sync_batch.send(items=_mixed_items(namespace))

    assert "IndexUnavailable" in failure_of(message)
    letter = state.runtime().dead_letters.get(message.message_id)
    assert letter is not None and letter.retries == 3 and "Chroma" in letter.reason
    assert len(embedding_service.embedding_requests) == 4  # every attempt embedded, then could not index
    # The embedded items wrote Redis on every attempt; failing for good, they are taken back.
    assert store.record("pet-0", namespace=namespace) is None
    assert store.record("pet-2", namespace=namespace) is None
    pet_1 = store.record("pet-1", namespace=namespace)
    assert pet_1 is not None and (pet_1.value, pet_1.version) == ("an older note", 1)
    assert store.history("pet-1", namespace=namespace) == []
    # The plain items had nothing to index: they finished on the first attempt and stay.
    assert store.keys(namespace=namespace) == ["lang", "pet-1", "prefs"]


def test_a_batch_delivered_twice_has_the_effect_of_one(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore, embedding_service: EmbeddingServer
) -> None:
    items = _mixed_items(namespace)
    message = memory_sync_batch.message(items=items)
    actors.broker.enqueue(message)
    first = result_of(message)
    actors.broker.enqueue(message)
    actors.broker.join(memory_sync_batch.queue_name, timeout=WAIT_MS)
    second = result_of(message)

    assert first["counts"] == {**NO_FAILURES, "applied": 5}
    for answer in (first, second):
        assert [r["version"] for r in answer["results"]] == [1] * 5
        assert {r["outcome"] for r in answer["results"]} <= {"applied", "duplicate"}
    assert len(embedding_service.embedding_requests) == 1  # the second delivery embeds nothing
    for item in items:
        record = store.record(item["key"], namespace=namespace)
        assert record is not None and record.version == 1
        assert store.history(item["key"], namespace=namespace) == []
    assert [hit.version for hit in actors.search("cat", k=5, namespace=namespace)] == [1, 1, 1]
