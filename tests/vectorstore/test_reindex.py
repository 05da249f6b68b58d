"""Reindex to another embedding model over real Redis, a real Chroma server and the embedding test server.

The test server answers any model name, and its vectors depend only on the text and the dimensions
asked for, so the new model here differs in its dimensions too (32, not 64): a query embedded with
the wrong model could not be run against the other model's collections.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from kvstore import KeyRef, MemoryStore
from tests.conftest import API_KEY
from tests.support.embedding_server import EmbeddingServer
from tests.support.worker import wait_until
from vectorstore.active import ActiveIndexes, IndexSpec, IndexState, Migration, ReindexError, specs_in_chroma
from vectorstore.embedder import OpenAIEmbedder
from vectorstore.index import chroma_client
from vectorstore.reconcile import find_drift
from vectorstore.reindex import ReindexSummary, abort, drop_old, reindex
from vectorstore.sync import SyncItem

OLD = IndexSpec("test-embedding", None)
NEW = IndexSpec("test-embedding-v2", 32)
SHARDS = 2
CHECK_MS = 50
MakeIndexes = Callable[..., ActiveIndexes]


class _Stop(Exception):
    """Stands for a reindex killed in the middle."""


@pytest.fixture
def make_indexes(
    redis_client: redis.Redis, chroma_url: str, prefix: str, embedding_service: EmbeddingServer
) -> Iterator[MakeIndexes]:
    """Builds a process's view of the active index on this test's prefix (as a worker or an app would)."""

    def make(default: IndexSpec = OLD) -> ActiveIndexes:
        store = MemoryStore(redis_client, prefix=prefix)
        return ActiveIndexes(
            store,
            chroma_client(chroma_url),
            lambda spec: OpenAIEmbedder(
                api_key=API_KEY,
                model=spec.model,
                dimensions=spec.dimensions,
                base_url=embedding_service.base_url,
            ),
            default=default,
            prefix=prefix,
            shards=SHARDS,
            check_ms=CHECK_MS,
        )

    yield make
    client = chroma_client(chroma_url)
    for names in specs_in_chroma(client, prefix, SHARDS).values():
        for name in names:
            client.delete_collection(name)


@pytest.fixture
def indexes(make_indexes: MakeIndexes) -> ActiveIndexes:
    return make_indexes()


def _texts(count: int) -> list[str]:
    animals = ["cat", "dog", "parrot", "horse", "goldfish", "rabbit", "turtle"]
    return [f"memory {n}: the user has a {animals[n % len(animals)]} named pet{n}" for n in range(count)]


def _fill(indexes: ActiveIndexes, namespace: str, count: int, *, every_embedded: bool = True) -> list[str]:
    """Sync `count` memories (every third one not embedded unless `every_embedded`); the embedded keys."""
    items = [
        SyncItem(f"k{n:03d}", text, namespace, embed=every_embedded or n % 3 != 0)
        for n, text in enumerate(_texts(count))
    ]
    for result in indexes.memories().sync_many(items):
        assert not isinstance(result, Exception)
    return [item.key for item in items if item.embed]


def _inputs(server: EmbeddingServer, spec: IndexSpec) -> int:
    return sum(r.inputs for r in server.embedding_requests if r.model == spec.model and r.status == 200)


def _last_model(server: EmbeddingServer) -> str | None:
    return server.embedding_requests[-1].model


def _in_step(indexes: ActiveIndexes, spec: IndexSpec, namespaces: list[str]) -> None:
    """Assert that `spec`'s index holds exactly the current embedded records of the namespaces."""
    memories = indexes.memories_for(spec, mirrored=False)
    for namespace in namespaces:
        drift = find_drift(memories, namespace)
        assert drift.counts() == {"missing": 0, "stale": 0, "orphan": 0}, (namespace, drift)


def test_a_reindex_moves_every_embedded_memory_to_the_new_model(
    indexes: ActiveIndexes, embedding_service: EmbeddingServer
) -> None:
    embedded = {ns: _fill(indexes, ns, 25, every_embedded=False) for ns in ("ns-a", "ns-b")}
    indexes.memories().sync("k001", "gone soon", embed=True, namespace="ns-a")
    indexes.memories().sync("k001", "now a plain value", embed=False, namespace="ns-a")
    embedding_service.clear_log()

    summary = reindex(indexes, NEW, batch_size=10)

    new_index = indexes.index_for(NEW)
    found = {(e.namespace, e.key) for ns in embedded for e in new_index.entries(ns)}
    wanted = {(ns, key) for ns, keys in embedded.items() for key in keys if (ns, key) != ("ns-a", "k001")}
    assert found == wanted
    _in_step(indexes, NEW, list(embedded))
    assert _inputs(embedding_service, NEW) == len(wanted) == summary.embedded
    assert [r.dimensions for r in embedding_service.embedding_requests] == [32] * summary.batches
    assert (summary.done, summary.total, summary.switched) == (50, 50, True)
    assert indexes.state(fresh=True) == IndexState(NEW, None)


def test_search_answers_from_the_old_model_until_the_switch_and_from_the_new_after(
    make_indexes: MakeIndexes, embedding_service: EmbeddingServer
) -> None:
    runner: ActiveIndexes = make_indexes()
    _fill(runner, "ns", 30)
    # An app whose EMBEDDING_MODEL is already the new one: it follows the record, not its setting.
    app: ActiveIndexes = make_indexes(NEW)
    seen: list[tuple[str | None, list[str]]] = []

    def search_meanwhile(summary: ReindexSummary) -> None:
        hits = app.memories().search("which user has a goldfish named pet4", k=1, namespace="ns")
        seen.append((_last_model(embedding_service), [hit.key for hit in hits]))

    reindex(runner, NEW, batch_size=10, progress=search_meanwhile)
    time.sleep(CHECK_MS / 1000)
    after = app.memories().search("which user has a goldfish named pet4", k=1, namespace="ns")

    assert seen == [(OLD.model, ["k004"])] * 3
    assert _last_model(embedding_service) == NEW.model
    assert [hit.key for hit in after] == ["k004"]
    assert app.memories().index.model == NEW.model


def test_drop_old_removes_the_old_collections(indexes: ActiveIndexes) -> None:
    _fill(indexes, "ns", 12)
    assert set(specs_in_chroma(indexes.client, indexes.prefix, SHARDS)) == {OLD}

    summary = reindex(indexes, NEW, batch_size=5, drop=True)

    assert set(specs_in_chroma(indexes.client, indexes.prefix, SHARDS)) == {NEW}
    assert summary.dropped and all(".test-embedding.native." in name for name in summary.dropped)
    assert [hit.key for hit in indexes.memories().search("a rabbit named pet5", k=1, namespace="ns")] == [
        "k005"
    ]


def test_a_reindex_stopped_midway_resumes_without_embedding_finished_batches_again(
    indexes: ActiveIndexes, embedding_service: EmbeddingServer
) -> None:
    _fill(indexes, "ns-a", 20)
    _fill(indexes, "ns-b", 20)
    embedding_service.clear_log()

    def stop_after_three(summary: ReindexSummary) -> None:
        if summary.batches == 3:
            raise _Stop

    with pytest.raises(_Stop):
        reindex(indexes, NEW, batch_size=8, progress=stop_after_three)
    state = indexes.state(fresh=True)
    # Batches of 8, 8 and 4: all of ns-a.
    assert state.active == OLD and state.migration is not None and state.migration.done == 20
    assert _inputs(embedding_service, NEW) == 20
    embedding_service.clear_log()

    summary = reindex(indexes, NEW, batch_size=8)

    assert (summary.resumed_at, summary.done, summary.embedded) == (20, 40, 20)
    assert _inputs(embedding_service, NEW) == 20
    _in_step(indexes, NEW, ["ns-a", "ns-b"])


def test_syncs_during_the_migration_are_all_findable_after_the_switch(
    make_indexes: MakeIndexes, embedding_service: EmbeddingServer
) -> None:
    runner: ActiveIndexes = make_indexes()
    worker: ActiveIndexes = make_indexes()
    _fill(runner, "ns-a", 40)
    _fill(runner, "ns-b", 40)
    embedding_service.latency_ms = 20
    stop = threading.Event()
    written: list[int] = []
    failures: list[BaseException] = []

    def sync_meanwhile() -> None:
        n = 0
        try:
            while not stop.is_set():
                namespace = "ns-a" if n % 2 else "ns-b"
                items = [
                    SyncItem(
                        f"k{(n * 7) % 40:03d}",
                        f"update {n}: the user now owns a llama",
                        namespace,
                        embed=True,
                    ),
                    SyncItem(f"new{n:04d}", f"new memory {n} about a zebra", namespace, embed=True),
                    SyncItem(f"k{(n * 11) % 40:03d}", f"plain {n}", namespace, embed=n % 3 == 0),
                ]
                for result in worker.memories().sync_many(items):
                    assert not isinstance(result, Exception), result
                n += 1
                written.append(n)
        except BaseException as error:  # reported by the test thread
            failures.append(error)

    thread = threading.Thread(target=sync_meanwhile)
    thread.start()

    def a_sync_after_each_batch(summary: ReindexSummary) -> None:
        wanted = len(written) + 1
        wait_until(lambda: len(written) >= wanted or failures, 30, "a sync between two batches")

    try:
        summary = reindex(runner, NEW, batch_size=5, progress=a_sync_after_each_batch)
        wanted = len(written) + 2
        wait_until(lambda: len(written) >= wanted or failures, 30, "syncs after the switch")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not failures
    assert summary.switched and len(written) >= summary.batches + 2

    _in_step(runner, NEW, ["ns-a", "ns-b"])
    last = written[-1] - 1
    namespace = "ns-a" if last % 2 else "ns-b"
    hits = worker.memories().search(f"new memory {last} about a zebra", k=1, namespace=namespace)
    assert [hit.key for hit in hits] == [f"new{last:04d}"]


def test_another_target_and_drop_old_are_refused_while_a_migration_is_under_way(
    indexes: ActiveIndexes,
) -> None:
    _fill(indexes, "ns", 6)

    def stop(summary: ReindexSummary) -> None:
        raise _Stop

    with pytest.raises(_Stop):
        reindex(indexes, NEW, batch_size=2, progress=stop)
    with pytest.raises(
        ReindexError, match=re.escape("a migration to test-embedding-v2 (32 dimensions) is under way")
    ):
        reindex(indexes, IndexSpec("test-embedding-v3", 16))
    with pytest.raises(ReindexError, match="run reindex to finish it before dropping"):
        drop_old(indexes)


def test_a_reindex_to_the_index_in_use_changes_nothing(
    indexes: ActiveIndexes, embedding_service: EmbeddingServer
) -> None:
    _fill(indexes, "ns", 6)
    embedding_service.clear_log()
    summary = reindex(indexes, OLD)
    assert (summary.switched, summary.done, embedding_service.embedding_requests) == (False, 0, [])


def test_the_first_process_records_the_index_chroma_already_holds(
    make_indexes: MakeIndexes, redis_client: redis.Redis
) -> None:
    first: ActiveIndexes = make_indexes()
    _fill(first, "ns", 3)
    redis_client.delete(first.store.keys_of.active_index())  # as before memsync recorded it

    later: ActiveIndexes = make_indexes(NEW)

    assert later.state().active == OLD
    assert later.memories().search("a parrot named pet2", k=1, namespace="ns")[0].key == "k002"


def test_the_copy_waits_for_a_key_another_writer_holds(indexes: ActiveIndexes) -> None:
    _fill(indexes, "ns", 4)
    store = indexes.store
    held = KeyRef("ns", "k002")
    assert store.take_locks([held], "another-writer", 5_000) == [True]
    threading.Timer(0.3, lambda: store.release_locks([held], "another-writer")).start()

    reindex(indexes, NEW, batch_size=10)

    _in_step(indexes, NEW, ["ns"])


def test_a_run_whose_migration_another_run_finished_stops_copying(indexes: ActiveIndexes) -> None:
    _fill(indexes, "ns", 30)
    other: list[ReindexSummary] = []

    def another_run_finishes_first(summary: ReindexSummary) -> None:
        if not other:
            other.append(reindex(indexes, NEW, batch_size=10))

    first = reindex(indexes, NEW, batch_size=5, progress=another_run_finishes_first)

    assert other[0].switched and other[0].resumed_at == 5 and other[0].done == 30
    assert first.switched and first.batches == 2  # its second checkpoint found the migration switched
    assert indexes.state(fresh=True) == IndexState(NEW, None)
    _in_step(indexes, NEW, ["ns"])


def test_an_aborted_migration_leaves_the_old_index_active_and_a_later_one_reuses_what_was_copied(
    indexes: ActiveIndexes, embedding_service: EmbeddingServer
) -> None:
    _fill(indexes, "ns", 20)

    def stop_after_two(summary: ReindexSummary) -> None:
        if summary.batches == 2:
            raise _Stop

    with pytest.raises(_Stop):
        reindex(indexes, NEW, batch_size=5, progress=stop_after_two)
    given_up = abort(indexes)
    assert given_up is not None and (given_up.target, given_up.done) == (NEW, 10)
    assert indexes.state(fresh=True) == IndexState(OLD, None)
    time.sleep(CHECK_MS / 1000)
    indexes.memories().sync("k003", "changed after the abort: a snake", embed=True, namespace="ns")
    assert indexes.memories().search("a snake", k=1, namespace="ns")[0].key == "k003"
    embedding_service.clear_log()

    summary = reindex(indexes, NEW, batch_size=5)

    assert (summary.resumed_at, summary.embedded) == (0, 11)  # the 10 not copied, and the one changed since
    assert _inputs(embedding_service, NEW) == 11
    _in_step(indexes, NEW, ["ns"])
    assert abort(indexes) is None


def test_a_migration_that_has_switched_cannot_be_aborted(indexes: ActiveIndexes) -> None:
    indexes.state()
    indexes.records.switch(indexes.records.begin(Migration(NEW, OLD)))
    with pytest.raises(ReindexError, match="has switched already"):
        abort(indexes)


def test_a_run_whose_migration_was_aborted_meanwhile_stops_without_switching(indexes: ActiveIndexes) -> None:
    _fill(indexes, "ns", 20)

    def aborted_by_another(summary: ReindexSummary) -> None:
        abort(indexes)

    with pytest.raises(ReindexError, match="given up meanwhile"):
        reindex(indexes, NEW, batch_size=5, progress=aborted_by_another)
    assert indexes.state(fresh=True) == IndexState(OLD, None)


def test_a_reindex_carries_a_long_text_as_every_one_of_its_chunks_with_its_metadata(
    indexes: ActiveIndexes,
) -> None:
    text = "The committee met again on a grey morning. " * 2_500 + "The soup wanted smoked paprika."
    memories = indexes.memories()
    memories.sync("minutes", text, embed=True, namespace="ns-a", metadata={"kind": "minutes"})
    chunks = len(memories.embedder.chunker.split(text))
    assert chunks >= 3

    reindex(indexes, NEW, batch_size=10)

    entries = sorted(
        (e for e in indexes.index_for(NEW).entries("ns-a") if e.key == "minutes"), key=lambda e: e.chunk
    )
    assert [(e.chunk, e.chunks, dict(e.metadata)) for e in entries] == [
        (n, chunks, {"kind": "minutes"}) for n in range(chunks)
    ]
    _in_step(indexes, NEW, ["ns-a"])
    [hit] = indexes.memories().search("smoked paprika soup", k=1, namespace="ns-a")
    assert (hit.key, hit.chunk) == ("minutes", chunks - 1)
