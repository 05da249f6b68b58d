"""VectorIndex against a real Chroma server: shards, and upserts from many threads written together."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from kvstore import KeyRef
from tests.support.services import start_chroma
from vectorstore import IndexEntry, IndexUnavailable, VectorIndex, chroma_client
from vectorstore.index import Vectors

DIMS = 8


@pytest.fixture
def index(chroma_url: str, prefix: str) -> Iterator[VectorIndex]:
    made = VectorIndex(
        chroma_client(chroma_url), model="index-test", dimensions=DIMS, prefix=prefix, shards=4
    )
    yield made
    made.drop_all()


def _rows(count: int, seed: int) -> Vectors:
    rows: Vectors = np.random.default_rng(seed).standard_normal((count, DIMS)).astype(np.float32)
    normalised: Vectors = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return normalised


def test_a_namespace_lives_in_one_shard_and_its_query_sees_only_its_vectors(index: VectorIndex) -> None:
    entries = [IndexEntry(f"ns-{n % 6}", f"k{n}", 1, "h") for n in range(30)]
    index.upsert(entries, _rows(30, 1))
    for namespace in {entry.namespace for entry in entries}:
        hits = index.query(namespace, _rows(1, 2)[0], 10)
        assert {hit.namespace for hit in hits} == {namespace}
        assert len(hits) == 5
    assert index.namespaces() == [f"ns-{n}" for n in range(6)]


def test_upserts_from_many_threads_at_once_are_all_written(index: VectorIndex) -> None:
    start = threading.Barrier(8)

    def upsert(thread: int) -> None:
        entries = [IndexEntry(f"ns-{(thread + n) % 5}", f"t{thread}-{n}", 1, "h") for n in range(5)]
        start.wait()
        index.upsert(entries, _rows(5, thread))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(upsert, range(8)))
    refs = [KeyRef(f"ns-{(t + n) % 5}", f"t{t}-{n}") for t in range(8) for n in range(5)]
    assert set(index.stored(refs)) == set(refs)


def test_the_same_key_twice_in_one_write_keeps_the_later_vector(index: VectorIndex) -> None:
    """Upserts written together may name one key twice (Chroma refuses repeated ids in a request)."""
    index.upsert([IndexEntry("ns", "shared", 1, "h1"), IndexEntry("ns", "shared", 2, "h2")], _rows(2, 3))
    [entry] = index.stored([KeyRef("ns", "shared")]).values()
    assert (entry.version, entry.content_hash) == (2, "h2")
    assert len(list(index.entries("ns"))) == 1


def test_an_upsert_to_an_unreachable_chroma_fails_in_every_thread_that_shared_it(
    prefix: str, tmp_path: Path
) -> None:
    service = start_chroma(tmp_path / "chroma")
    client = chroma_client(service.url)
    service.stop()  # reached once, then gone
    unreachable = VectorIndex(client, model="index-test", dimensions=DIMS, prefix=prefix, shards=4)
    failures: list[BaseException] = []

    def upsert(thread: int) -> None:
        try:
            unreachable.upsert([IndexEntry("ns", f"k{thread}", 1, "h")], _rows(1, thread))
        except IndexUnavailable as error:
            failures.append(error)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(upsert, range(4)))
    assert len(failures) == 4
    assert len({id(failure) for failure in failures}) == 4, "each thread raises its own error"
