"""Memories.sync_many: a batch's shared steps, with each item's guarantees kept item by item.

Real Redis, a real Chroma server and the openai SDK against the test embedding server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from kvstore import (
    InvalidKey,
    InvalidValue,
    KeyRef,
    MemoryStore,
    Record,
    WriteMeta,
    WriteResult,
    content_hash,
)
from tests.conftest import API_KEY
from tests.support.embedding_server import EmbeddingServer, RecordedRequest
from tests.support.refusing import REFUSED, RefusingEmbedder
from vectorstore import (
    EmbeddingRejected,
    EmbeddingUnavailable,
    IndexEntry,
    ItemResult,
    Memories,
    OpenAIEmbedder,
    SyncItem,
    VectorIndex,
    chroma_client,
)

MODEL = "test-embedding"
NS = "default"
#: Words that share nothing, so that searching one finds the memory that holds it.
ANIMALS = ("cat", "dog", "parrot", "hamster", "goldfish", "rabbit", "tortoise", "horse")


@pytest.fixture
def embedder(embedding_service: EmbeddingServer) -> Iterator[OpenAIEmbedder]:
    embedder = OpenAIEmbedder(api_key=API_KEY, model=MODEL, base_url=embedding_service.base_url)
    yield embedder
    embedder.close()


@pytest.fixture
def index(chroma_url: str, prefix: str) -> Iterator[VectorIndex]:
    index = VectorIndex(chroma_client(chroma_url), model=MODEL, dimensions=None, prefix=prefix)
    yield index
    index.drop_all()


@pytest.fixture
def store(redis_client: redis.Redis, prefix: str) -> MemoryStore:
    return MemoryStore(redis_client, prefix=prefix, history_length=5)


@pytest.fixture
def memories(store: MemoryStore, index: VectorIndex, embedder: OpenAIEmbedder) -> Memories:
    return Memories(store, index, embedder)


@pytest.fixture
def refusing_memories(store: MemoryStore, index: VectorIndex, embedder: OpenAIEmbedder) -> Memories:
    """Memories whose embedding server refuses any text holding REFUSED."""
    return Memories(store, index, RefusingEmbedder(embedder))


def _record(result: ItemResult) -> Record:
    assert isinstance(result, WriteResult), f"expected a write result, got {result!r}"
    assert result.current is not None
    return result.current


def _outcomes(results: list[ItemResult]) -> list[str]:
    return [r.outcome.value if isinstance(r, WriteResult) else type(r).__name__ for r in results]


def _versions(results: list[ItemResult]) -> list[int]:
    return [_record(result).version for result in results]


def _requests_since(server: EmbeddingServer, before: int) -> list[RecordedRequest]:
    return server.embedding_requests[before:]


def _inputs_since(server: EmbeddingServer, before: int) -> list[int]:
    return [request.inputs for request in _requests_since(server, before)]


def _entry(memories: Memories, key: str) -> IndexEntry | None:
    ref = KeyRef(NS, key)
    return memories.index.stored([ref]).get(ref)


def _found(memories: Memories, query: str, k: int = 5) -> list[tuple[str, object, int]]:
    return [(hit.key, hit.value, hit.version) for hit in memories.search(query, k=k)]


def _pets(count: int) -> list[SyncItem]:
    return [SyncItem(f"pet-{n}", f"the user has a {ANIMALS[n]}", embed=True) for n in range(count)]


# One request for the batch.


def test_a_batch_of_embedded_items_makes_one_embedding_request_and_every_item_is_searchable(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    results = memories.sync_many(_pets(8))
    assert _outcomes(results) == ["applied"] * 8
    assert [r.inputs for r in embedding_service.embedding_requests] == [8]
    for n, animal in enumerate(ANIMALS):
        assert _found(memories, animal, k=1) == [(f"pet-{n}", f"the user has a {animal}", 1)]


def test_a_batch_of_plain_items_makes_no_embedding_request_and_no_chroma_write(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    items = [SyncItem(f"plain-{n}", {"n": n, "animal": ANIMALS[n]}) for n in range(5)]
    results = memories.sync_many(items)
    assert _outcomes(results) == ["applied"] * 5
    assert embedding_service.embedding_requests == []
    assert list(memories.index.all_entries()) == []
    assert memories.store.get("plain-3") == {"n": 3, "animal": "hamster"}


# One bad item fails alone.


def test_invalid_items_fail_alone_naming_their_problem_and_write_nothing(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    items = [
        SyncItem("good-embedded", "the user has a cat", embed=True),
        SyncItem("", "a value for an empty key"),
        SyncItem("not-json", float("nan")),
        SyncItem("nothing-to-embed", "", embed=True),
        SyncItem("blank-to-embed", "   ", embed=True),
        SyncItem("bad-namespace", "v", namespace="a:b"),
        SyncItem("good-plain", {"theme": "dark"}),
    ]
    results = memories.sync_many(items)

    assert _outcomes(results) == [
        "applied", "InvalidKey", "InvalidValue", "InvalidValue", "InvalidValue", "InvalidKey", "applied",
    ]  # fmt: skip
    problems = [str(r) for r in results if isinstance(r, InvalidKey | InvalidValue)]
    assert problems[0] == "key is empty"
    assert "nan" in problems[1].lower() and "JSON" in problems[1]
    assert "nothing to embed" in problems[2] and "nothing to embed" in problems[3]
    assert "namespace" in problems[4]
    assert memories.store.keys() == ["good-embedded", "good-plain"]
    assert memories.store.namespaces() == [NS]
    assert [r.inputs for r in embedding_service.embedding_requests] == [1]
    assert _found(memories, "cat") == [("good-embedded", "the user has a cat", 1)]


# Duplicates and order, item by item.


@pytest.mark.parametrize("ordered", [False, True], ids=["direct-call", "one-message"])
def test_the_later_of_two_items_for_one_key_in_a_batch_wins(
    memories: Memories, embedding_service: EmbeddingServer, ordered: bool
) -> None:
    message = WriteMeta("batch-msg", 1_000)
    metas = [message.item(0), message.item(1)] if ordered else [None, None]
    results = memories.sync_many(
        [
            SyncItem("pet", "the user has a cat", embed=True, meta=metas[0]),
            SyncItem("pet", "the user has a dog", embed=True, meta=metas[1]),
        ]
    )
    assert _outcomes(results) == ["applied", "applied"]
    assert _versions(results) == [1, 2]
    assert len(embedding_service.embedding_requests) == 1
    record = memories.store.record("pet")
    assert record is not None and (record.value, record.version) == ("the user has a dog", 2)
    assert [old.value for old in memories.store.history("pet")] == ["the user has a cat"]
    assert _entry(memories, "pet") == IndexEntry(NS, "pet", 2, content_hash("the user has a dog"))
    assert _found(memories, "cat") == [("pet", "the user has a dog", 2)]


def test_an_item_of_an_older_message_after_a_newer_one_in_the_same_batch_is_stale(
    memories: Memories,
) -> None:
    results = memories.sync_many(
        [
            SyncItem("pet", "the user has a dog", embed=True, meta=WriteMeta("newer", 2_000)),
            SyncItem("pet", "the user has a cat", embed=True, meta=WriteMeta("older", 1_000)),
        ]
    )
    assert _outcomes(results) == ["applied", "stale"]
    assert _versions(results) == [1, 1]
    assert memories.store.get("pet") == "the user has a dog"
    assert _entry(memories, "pet") == IndexEntry(NS, "pet", 1, content_hash("the user has a dog"))


def test_a_batch_whose_items_were_applied_already_is_a_duplicate_and_embeds_nothing(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    message = WriteMeta("batch-msg", 1_000)
    items = [
        SyncItem("pet-0", "the user has a cat", embed=True, meta=message.item(0)),
        SyncItem("prefs", {"theme": "dark"}, meta=message.item(1)),
        SyncItem("pet-1", "the user has a dog", embed=True, meta=message.item(2)),
    ]
    assert _outcomes(memories.sync_many(items)) == ["applied"] * 3
    before = len(embedding_service.embedding_requests)

    again = [
        SyncItem(item.key, item.value, embed=item.embed, meta=WriteMeta(f"batch-msg:{n:05d}", 1_000))
        for n, item in enumerate(items)
    ]
    results = memories.sync_many(again)

    assert _outcomes(results) == ["duplicate"] * 3
    assert _versions(results) == [1, 1, 1]
    assert _inputs_since(embedding_service, before) == []
    for key in ("pet-0", "prefs", "pet-1"):
        assert memories.store.history(key) == []
    assert _entry(memories, "pet-1") == IndexEntry(NS, "pet-1", 1, content_hash("the user has a dog"))


def test_an_item_older_than_the_keys_current_writer_is_stale_and_not_embedded(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    memories.sync("pet", "the user has a dog", embed=True, meta=WriteMeta("m-2", 2_000))
    memories.sync("prefs", {"theme": "dark"}, meta=WriteMeta("m-2b", 2_000))
    before = len(embedding_service.embedding_requests)

    results = memories.sync_many(
        [
            SyncItem("pet", "the user has a cat", embed=True, meta=WriteMeta("m-1", 1_000)),
            SyncItem("fresh", "the user has a parrot", embed=True, meta=WriteMeta("m-1b", 1_000)),
            SyncItem("prefs", {"theme": "light"}, meta=WriteMeta("m-1c", 1_000)),
        ]
    )

    assert _outcomes(results) == ["stale", "applied", "stale"]
    stale = _record(results[0])
    assert (stale.value, stale.version, stale.msg_id) == ("the user has a dog", 1, "m-2")
    assert _inputs_since(embedding_service, before) == [1]  # the fresh item's text only
    assert memories.store.get("prefs") == {"theme": "dark"}
    assert _entry(memories, "pet") == IndexEntry(NS, "pet", 1, content_hash("the user has a dog"))


def test_a_redelivered_batch_finishes_the_index_steps_its_first_delivery_left_undone(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    memories.sync("pet", "the user has a cat", embed=True)
    memories.sync("note", "the user has a parrot", embed=True)
    message = WriteMeta("batch-msg", 10**13)
    items = [
        SyncItem("pet", "the user has a dog", embed=True, meta=message.item(0)),
        SyncItem("note", "no longer searchable", meta=message.item(1)),
        SyncItem("fresh", "the user has a hamster", embed=True, meta=message.item(2)),
    ]
    # The first delivery wrote Redis, then its worker died before the index step.
    for item in items:
        text_hash = content_hash(item.value) if item.embed else ""
        memories.store.set(item.key, item.value, embed=item.embed, content_hash=text_hash, meta=item.meta)
    before = len(embedding_service.embedding_requests)

    results = memories.sync_many(items)

    assert _outcomes(results) == ["duplicate"] * 3
    assert _versions(results) == [2, 2, 1]
    assert _inputs_since(embedding_service, before) == [2]  # "dog" and "hamster", in one request
    assert _entry(memories, "pet") == IndexEntry(NS, "pet", 2, content_hash("the user has a dog"))
    assert _entry(memories, "note") is None
    assert _entry(memories, "fresh") == IndexEntry(NS, "fresh", 1, content_hash("the user has a hamster"))


def _sharing_a_shard(index: VectorIndex, count: int) -> list[str]:
    """`count` namespaces whose vectors live in one shard collection, and one that lives elsewhere."""
    names = (f"user-{n}" for n in range(10_000))
    first = next(names)
    same = [first, *(ns for ns in names if index.shard_of(ns) == index.shard_of(first))][:count]
    other = next(
        ns for ns in (f"team-{n}" for n in range(10_000)) if index.shard_of(ns) != index.shard_of(first)
    )
    return [*same, other]


def test_one_key_in_several_namespaces_of_a_batch_stays_apart(memories: Memories) -> None:
    namespaces = _sharing_a_shard(memories.index, 3)
    results = memories.sync_many(
        [SyncItem("pet", f"the user has a {ANIMALS[n]}", ns, embed=True) for n, ns in enumerate(namespaces)]
    )
    assert [(_record(r).namespace, _record(r).version) for r in results] == [(ns, 1) for ns in namespaces]
    for n, ns in enumerate(namespaces):
        hits = memories.search("cat", k=5, namespace=ns)
        assert [(hit.key, hit.value, hit.namespace) for hit in hits] == [
            ("pet", f"the user has a {ANIMALS[n]}", ns)
        ]


def test_each_item_of_a_batch_keeps_its_own_time_to_live(memories: Memories) -> None:
    memories.sync_many(
        [
            SyncItem("short", "the user has a cat", embed=True, ttl_ms=60_000),
            SyncItem("forever", "the user has a dog", embed=True),
        ]
    )
    client, keys = memories.store.client, memories.store.keys_of
    assert 0 < client.pttl(keys.head(NS, "short")) <= 60_000
    assert client.pttl(keys.head(NS, "forever")) == -1


# Embedding failures.


def test_a_shared_embedding_request_that_fails_transiently_fails_only_the_embedded_items(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    message = WriteMeta("batch-msg", 1_000)
    items = [
        SyncItem("pet-0", "the user has a cat", embed=True, meta=message.item(0)),
        SyncItem("prefs", {"theme": "dark"}, meta=message.item(1)),
        SyncItem("pet-1", "the user has a dog", embed=True, meta=message.item(2)),
        SyncItem("lang", "en", meta=message.item(3)),
        SyncItem("pet-2", "the user has a parrot", embed=True, meta=message.item(4)),
    ]
    embedding_service.fail_next(503)
    first = memories.sync_many(items)

    unavailable = "EmbeddingUnavailable"
    assert _outcomes(first) == [unavailable, "applied", unavailable, "applied", unavailable]
    assert all("503" in str(r) for r in first if isinstance(r, EmbeddingUnavailable))
    assert memories.store.keys() == ["lang", "prefs"]
    for key in ("pet-0", "pet-1", "pet-2"):
        assert memories.store.record(key) is None
    assert list(memories.index.all_entries()) == []

    again = memories.sync_many(items)
    assert _outcomes(again) == ["applied", "duplicate", "applied", "duplicate", "applied"]
    assert _versions(again) == [1] * 5
    assert [(r.status, r.inputs) for r in embedding_service.embedding_requests] == [(503, 3), (200, 3)]
    assert _found(memories, "parrot", k=1) == [("pet-2", "the user has a parrot", 1)]


def test_an_input_the_embedding_server_refuses_fails_alone_and_its_neighbours_are_applied(
    refusing_memories: Memories, embedding_service: EmbeddingServer
) -> None:
    items = [SyncItem(f"pet-{n}", f"the user has a {ANIMALS[n]}", embed=True) for n in range(5)]
    items.insert(2, SyncItem("refused", f"the user has a {REFUSED}", embed=True))
    items.append(SyncItem("prefs", {"theme": "dark"}))

    results = refusing_memories.sync_many(items)

    assert _outcomes(results) == ["applied", "applied", "EmbeddingRejected"] + ["applied"] * 4
    refusal = results[2]
    assert isinstance(refusal, EmbeddingRejected) and refusal.status == 400
    assert "input" in str(refusal)
    assert refusing_memories.store.record("refused") is None
    assert _entry(refusing_memories, "refused") is None
    requests = embedding_service.embedding_requests
    assert requests[0].inputs == 6 and requests[0].status == 400  # the whole batch, refused once
    assert sum(r.inputs for r in requests if r.status == 200) == 5  # then each good text exactly once
    for n in range(5):
        assert _entry(refusing_memories, f"pet-{n}") is not None
    assert _found(refusing_memories, "hamster", k=1) == [("pet-3", "the user has a hamster", 1)]


def test_a_refusal_that_is_not_about_the_input_fails_every_embedded_item_without_splitting(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    embedding_service.fail_next(401)
    results = memories.sync_many([*_pets(4), SyncItem("prefs", {"theme": "dark"})])
    assert _outcomes(results) == ["EmbeddingRejected"] * 4 + ["applied"]
    assert [(r.status, r.inputs) for r in embedding_service.embedding_requests] == [(401, 4)]
    assert memories.store.keys() == ["prefs"]


# Unchanged values.


def test_with_skip_unchanged_the_same_values_make_no_new_version_and_no_embedding_request(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    memories.sync_many(
        [
            SyncItem("pet", "the user has a cat", embed=True),
            SyncItem("prefs", {"theme": "dark", "font": "large"}),
            SyncItem("note", "the user has a dog", embed=True),
            SyncItem("changed", "the user has a parrot", embed=True),
        ]
    )
    before = len(embedding_service.embedding_requests)

    results = memories.sync_many(
        [
            SyncItem("pet", "the user has a cat", embed=True),
            SyncItem("prefs", {"font": "large", "theme": "dark"}),  # the same JSON, keys in another order
            SyncItem("note", "the user has a dog", embed=False),  # the same value, no longer embedded
            SyncItem("changed", "the user has a hamster", embed=True),
        ],
        skip_unchanged=True,
    )

    assert _outcomes(results) == ["unchanged", "unchanged", "applied", "applied"]
    assert _versions(results) == [1, 1, 2, 2]
    assert _inputs_since(embedding_service, before) == [1]  # the changed text only
    assert memories.store.history("pet") == [] and memories.store.history("prefs") == []
    assert _entry(memories, "pet") == IndexEntry(NS, "pet", 1, content_hash("the user has a cat"))
    assert _entry(memories, "note") is None
    assert _found(memories, "hamster", k=1) == [("changed", "the user has a hamster", 2)]


def test_an_unchanged_text_resynced_in_a_batch_is_relabelled_not_embedded_again(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    memories.sync_many(_pets(4))
    before = len(embedding_service.embedding_requests)

    items = _pets(4)
    items[1] = SyncItem("pet-1", "the user has a horse", embed=True)
    results = memories.sync_many(items)

    assert _outcomes(results) == ["applied"] * 4
    assert _versions(results) == [2] * 4
    assert _inputs_since(embedding_service, before) == [1]  # "horse" only
    assert _entry(memories, "pet-0") == IndexEntry(NS, "pet-0", 2, content_hash("the user has a cat"))
    assert _found(memories, "cat", k=1) == [("pet-0", "the user has a cat", 2)]
    assert _found(memories, "horse", k=1) == [("pet-1", "the user has a horse", 2)]
    assert "the user has a dog" not in [value for _, value, _ in _found(memories, "dog", k=4)]


# The index lock.


def _wait_for_entry(memories: Memories, key: str, timeout_s: float) -> IndexEntry | None:
    deadline = time.monotonic() + timeout_s
    while (entry := _entry(memories, key)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return entry


def test_a_batch_writing_a_locked_key_indexes_it_once_the_lock_is_released(memories: Memories) -> None:
    memories.sync("pet", "the user has a cat", embed=True)
    locked = threading.Event()
    seen: dict[str, IndexEntry | None] = {}
    released_at: list[float] = []

    def hold_the_lock() -> None:
        with memories.store.key_lock("pet", timeout_ms=20_000):
            locked.set()
            # The batch indexes the key it could lock without waiting for the one it could not.
            seen["other"] = _wait_for_entry(memories, "other", timeout_s=10)
            time.sleep(0.5)
            seen["pet"] = _entry(memories, "pet")
            released_at.append(time.monotonic())

    with ThreadPoolExecutor(max_workers=1) as pool:
        holder = pool.submit(hold_the_lock)
        assert locked.wait(10)
        results = memories.sync_many(
            [
                SyncItem("pet", "the user has a dog", embed=True),
                SyncItem("other", "the user has a parrot", embed=True),
            ]
        )
        finished_at = time.monotonic()
        holder.result()

    assert _outcomes(results) == ["applied", "applied"]
    assert _versions(results) == [2, 1]
    assert seen["other"] is not None and seen["other"].version == 1
    # While another held the lock, the key's index stayed as it was; the batch waited for it.
    assert seen["pet"] == IndexEntry(NS, "pet", 1, content_hash("the user has a cat"))
    assert finished_at >= released_at[0]
    assert _entry(memories, "pet") == IndexEntry(NS, "pet", 2, content_hash("the user has a dog"))
    assert _found(memories, "dog", k=1) == [("pet", "the user has a dog", 2)]
    assert not memories.store.client.exists(memories.store.keys_of.lock(NS, "pet"))


def test_a_batch_leaves_no_index_lock_behind(memories: Memories) -> None:
    results = memories.sync_many([*_pets(6), SyncItem("pet-0", "the user has a horse", embed=True)])
    assert _versions(results) == [1] * 6 + [2]
    client = memories.store.client
    assert [client.exists(memories.store.keys_of.lock(NS, f"pet-{n}")) for n in range(6)] == [0] * 6
    assert len(list(memories.index.all_entries())) == 6
