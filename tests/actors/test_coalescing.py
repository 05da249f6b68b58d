"""Coalescing: concurrent single syncs share batches, and each message still gets its own item's answer.

First through the real broker and an in-process worker of 8 threads, then `Coalescer` on its own,
over a real `Memories` (Redis, a Chroma server, the openai SDK against the test embedding server).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dramatiq
import pytest
import redis

import actors
from actors import memory_sync, state
from actors.coalesce import Coalescer
from kvstore import MemoryStore, WriteResult
from tests.conftest import API_KEY
from tests.support.embedding_server import EmbeddingServer
from tests.support.refusing import REFUSED, RefusingEmbedder
from tests.support.results import failure_of, result_of
from vectorstore import (
    EmbeddingRejected,
    EmbeddingUnavailable,
    Memories,
    OpenAIEmbedder,
    SyncItem,
    VectorIndex,
    chroma_client,
)

MODEL = "test-embedding"
#: Words that share nothing, so that searching one finds the memory that holds it.
WORDS = (
    "cat", "dog", "parrot", "hamster", "goldfish", "rabbit", "tortoise", "horse", "piano", "violin",
    "guitar", "drums", "tennis", "chess", "sailing", "cooking", "hiking", "skiing", "python", "rust",
    "golang", "haskell", "paris", "tokyo", "lima", "oslo", "coffee", "tea", "cocoa", "juice", "winter",
    "spring", "summer", "autumn",
)  # fmt: skip


def _eight_threads() -> dramatiq.Worker:
    """An in-process worker of 8 threads (DESIGN: fast actors want 8 or more)."""
    return dramatiq.Worker(actors.broker, worker_threads=8, worker_timeout=50)


@pytest.fixture
def worker() -> Iterator[dramatiq.Worker]:
    """A running worker of 8 threads, on an empty broker."""
    actors.broker.flush_all()
    running = _eight_threads()
    running.start()
    yield running
    running.stop()


@pytest.fixture
def start_worker() -> Iterator[Callable[[], dramatiq.Worker]]:
    """Starts a worker of 8 threads when called: messages sent before find every thread free at once."""
    actors.broker.flush_all()
    started: list[dramatiq.Worker] = []

    def start() -> dramatiq.Worker:
        started.append(_eight_threads())
        started[-1].start()
        return started[-1]

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def slow_embeddings(embedding_service: EmbeddingServer) -> EmbeddingServer:
    """The workers' embedding server, taking 30 ms per request as a remote one would."""
    embedding_service.latency_ms = 30
    return embedding_service


def _text(n: int) -> str:
    return f"the user likes {WORDS[n]}"


def _sync(n: int, namespace: str) -> dramatiq.Message[Any]:
    return memory_sync.send(key=f"k-{n}", value=_text(n), embed=True, namespace=namespace)


# Through the worker.


def test_concurrent_single_syncs_share_embedding_requests_and_each_gets_its_own_result(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore, slow_embeddings: EmbeddingServer
) -> None:
    count = 32
    messages = [_sync(n, namespace) for n in range(count)]
    results = [result_of(message) for message in messages]

    for n, result in enumerate(results):
        assert (result["status"], result["key"], result["version"], result["outcome"]) == (
            "success", f"k-{n}", 1, "applied",
        )  # fmt: skip
        record = store.record(f"k-{n}", namespace=namespace)
        assert record is not None and record.value == _text(n)
        assert record.msg_id == messages[n].message_id
    requests = slow_embeddings.embedding_requests
    assert all(r.status == 200 for r in requests)
    assert sum(r.inputs for r in requests) == count  # every text embedded once
    assert len(requests) < count  # and in shared requests
    assert [hit.key for hit in actors.search("chess", k=1, namespace=namespace)] == ["k-13"]


def test_an_input_the_server_refuses_fails_its_own_message_alone_in_a_shared_batch(
    start_worker: Callable[[], dramatiq.Worker],
    namespace: str,
    store: MemoryStore,
    slow_embeddings: EmbeddingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    memories = state.runtime().memories
    monkeypatch.setattr(memories, "embedder", RefusingEmbedder(memories.embedder))
    good = [_sync(n, namespace) for n in range(3)]
    refused = memory_sync.send(key="refused", value=f"a {REFUSED}", embed=True, namespace=namespace)
    good += [_sync(n, namespace) for n in range(3, 12)]
    start_worker()

    assert "EmbeddingRejected" in failure_of(refused)
    assert all(result_of(message)["status"] == "success" for message in good)
    letter = state.runtime().dead_letters.get(refused.message_id)
    assert letter is not None and letter.retries == 0 and "answered 400" in letter.reason
    assert store.record("refused", namespace=namespace) is None
    requests = slow_embeddings.embedding_requests
    # The refused text went out with neighbours, and the refusal was narrowed down to it.
    assert any(r.status == 400 and r.inputs > 1 for r in requests), [(r.status, r.inputs) for r in requests]
    assert sum(r.inputs for r in requests if r.status == 200) == len(good)
    assert sorted(store.keys(namespace=namespace)) == sorted(f"k-{n}" for n in range(12))


def test_an_empty_text_fails_its_own_message_alone_among_concurrent_syncs(
    start_worker: Callable[[], dramatiq.Worker],
    namespace: str,
    store: MemoryStore,
    slow_embeddings: EmbeddingServer,
) -> None:
    good = [_sync(n, namespace) for n in range(3)]
    blank = memory_sync.send(key="blank", value="   ", embed=True, namespace=namespace)
    good += [_sync(n, namespace) for n in range(3, 6)]
    start_worker()

    assert "InvalidValue" in failure_of(blank)
    assert all(result_of(message)["status"] == "success" for message in good)
    letter = state.runtime().dead_letters.get(blank.message_id)
    assert letter is not None and letter.retries == 0 and "nothing to embed" in letter.reason
    assert store.record("blank", namespace=namespace) is None
    assert sum(r.inputs for r in slow_embeddings.embedding_requests) == len(good)


def test_a_transient_failure_of_a_shared_request_retries_each_message_until_all_are_applied(
    start_worker: Callable[[], dramatiq.Worker],
    namespace: str,
    store: MemoryStore,
    slow_embeddings: EmbeddingServer,
) -> None:
    slow_embeddings.fail_next(503, count=1)
    count = 16
    messages = [_sync(n, namespace) for n in range(count)]
    start_worker()

    assert [result_of(message)["version"] for message in messages] == [1] * count
    requests = slow_embeddings.embedding_requests
    [failed] = [r for r in requests if r.status != 200]
    assert failed.status == 503 and failed.inputs > 1  # a shared request failed
    assert sum(r.inputs for r in requests if r.status == 200) == count
    for n, message in enumerate(messages):
        record = store.record(f"k-{n}", namespace=namespace)
        assert record is not None and (record.version, record.msg_id) == (1, message.message_id)
        assert store.history(f"k-{n}", namespace=namespace) == []


# Coalescer on its own, over a real Memories.


@pytest.fixture
def embedder(embedding_service: EmbeddingServer) -> Iterator[OpenAIEmbedder]:
    embedder = OpenAIEmbedder(api_key=API_KEY, model=MODEL, base_url=embedding_service.base_url)
    yield embedder
    embedder.close()


@pytest.fixture
def memories(
    redis_client: redis.Redis, chroma_url: str, prefix: str, embedder: OpenAIEmbedder
) -> Iterator[Memories]:
    index = VectorIndex(chroma_client(chroma_url), model=MODEL, dimensions=None, prefix=prefix)
    yield Memories(MemoryStore(redis_client, prefix=prefix), index, embedder)
    index.drop_all()


def _together(coalescer: Coalescer, items: list[SyncItem]) -> list[WriteResult | Exception]:
    """Sync every item from a thread of its own, all released at once; each thread's outcome."""
    start = threading.Barrier(len(items))

    def one(item: SyncItem) -> WriteResult | Exception:
        start.wait()
        try:
            return coalescer.sync(item)
        except Exception as error:
            return error

    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(one, items))


def _items(count: int) -> list[SyncItem]:
    return [SyncItem(f"k-{n}", _text(n), embed=True) for n in range(count)]


def _keys(outcomes: list[WriteResult | Exception]) -> list[str | None]:
    return [o.current.key if isinstance(o, WriteResult) and o.current else None for o in outcomes]


def test_a_coalescer_with_a_window_of_zero_runs_every_sync_as_a_batch_of_one(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    coalescer = Coalescer(memories.sync_many, window_ms=0, max_items=100)
    outcomes = _together(coalescer, _items(6))
    assert _keys(outcomes) == [f"k-{n}" for n in range(6)]
    assert [r.inputs for r in embedding_service.embedding_requests] == [1] * 6


def test_a_plain_sync_runs_at_once_without_waiting_for_the_window(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    coalescer = Coalescer(memories.sync_many, window_ms=5_000, max_items=100)
    started = time.monotonic()
    result = coalescer.sync(SyncItem("prefs", {"theme": "dark"}))
    assert time.monotonic() - started < 2.0
    assert result.current is not None and (result.current.value, result.current.version) == (
        {"theme": "dark"},
        1,
    )
    assert embedding_service.embedding_requests == []


def test_a_lone_embedded_sync_waits_for_the_window_then_runs_alone(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    coalescer = Coalescer(memories.sync_many, window_ms=300, max_items=100)
    started = time.monotonic()
    result = coalescer.sync(SyncItem("pet", _text(0), embed=True))
    assert time.monotonic() - started >= 0.29
    assert result.current is not None and result.current.version == 1
    assert [r.inputs for r in embedding_service.embedding_requests] == [1]


def test_a_coalescer_closes_a_group_at_max_items_without_waiting_for_the_window(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    coalescer = Coalescer(memories.sync_many, window_ms=5_000, max_items=3)
    started = time.monotonic()
    outcomes = _together(coalescer, _items(6))
    assert time.monotonic() - started < 4.0
    assert _keys(outcomes) == [f"k-{n}" for n in range(6)]
    assert [r.inputs for r in embedding_service.embedding_requests] == [3, 3]


def test_a_coalescer_gathers_the_syncs_of_its_window_into_one_batch(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    coalescer = Coalescer(memories.sync_many, window_ms=500, max_items=100)
    outcomes = _together(coalescer, _items(5))
    assert [o.current.version if isinstance(o, WriteResult) and o.current else None for o in outcomes] == [
        1
    ] * 5
    assert _keys(outcomes) == [f"k-{n}" for n in range(5)]
    assert [r.inputs for r in embedding_service.embedding_requests] == [5]


def test_a_coalescer_raises_an_items_refusal_only_in_its_own_thread(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    refusing = Memories(memories.store, memories.index, RefusingEmbedder(memories.embedder))
    coalescer = Coalescer(refusing.sync_many, window_ms=5_000, max_items=5)
    items = _items(5)
    items[3] = SyncItem("refused", f"a {REFUSED}", embed=True)

    outcomes = _together(coalescer, items)

    assert _keys(outcomes) == ["k-0", "k-1", "k-2", None, "k-4"]
    assert isinstance(outcomes[3], EmbeddingRejected) and outcomes[3].status == 400
    assert embedding_service.embedding_requests[0].inputs == 5
    assert memories.store.record("refused") is None


def test_a_coalescer_gives_every_thread_its_own_copy_of_a_shared_failure(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    coalescer = Coalescer(memories.sync_many, window_ms=5_000, max_items=4)
    embedding_service.fail_next(503)
    outcomes = _together(coalescer, _items(4))

    assert all(isinstance(o, EmbeddingUnavailable) for o in outcomes)
    assert len({id(o) for o in outcomes}) == 4
    assert [(r.status, r.inputs) for r in embedding_service.embedding_requests] == [(503, 4)]
    assert memories.store.keys() == []

    again = _together(coalescer, _items(4))
    assert _keys(again) == [f"k-{n}" for n in range(4)]
