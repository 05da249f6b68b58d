"""Metadata per version, filtered search, listing and what a hit tells, on real parts."""

from __future__ import annotations

from typing import Any

import pytest

from kvstore import InvalidMetadata, KeyRef
from kvstore.errors import InvalidFilter
from kvstore.listing import list_memories
from tests.support.embedding_server import EmbeddingServer
from vectorstore import IndexEntry, InvalidQuery, Memories, SyncItem
from vectorstore.reconcile import reconcile

NS = "default"
#: Memories that share the word "pet", each with metadata of every kind of value.
PETS: dict[str, tuple[str, dict[str, Any]]] = {
    "cat": ("the pet is a cat", {"kind": "fact", "legs": 4, "weight": 4.5, "indoor": True}),
    "dog": ("the pet is a dog", {"kind": "fact", "legs": 4, "weight": 30.0, "indoor": False}),
    "parrot": ("the pet is a parrot", {"kind": "episode", "legs": 2, "weight": 0.4, "indoor": True}),
    "snake": ("the pet is a snake", {"kind": "preference", "legs": 0, "weight": 2.0}),
    "fish": ("the pet is a fish", {}),
}


@pytest.fixture(params=["chroma-filter", "nearest-then-filter"])
def search_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way search() can take: Chroma's filter, or the shard's nearest filtered in the join."""
    share = 2.0 if request.param == "chroma-filter" else 0.0
    monkeypatch.setattr("vectorstore.search.DOMINANT_SHARE", share)
    return str(request.param)


@pytest.fixture
def pets(memories: Memories) -> Memories:
    items = [SyncItem(key, text, embed=True, metadata=meta) for key, (text, meta) in PETS.items()]
    results = memories.sync_many(items)
    assert not [r for r in results if isinstance(r, Exception)]
    return memories


def _found(memories: Memories, where: Any, k: int = 10) -> list[str]:
    return sorted(hit.key for hit in memories.search("pet", k=k, where=where))


def _chroma_labels(memories: Memories, key: str) -> dict[str, Any]:
    ref = KeyRef(NS, key)
    return dict(memories.index.stored([ref])[ref].metadata)


# Metadata is part of the version.


def test_metadata_is_kept_with_the_value_in_the_history_and_on_the_vector(memories: Memories) -> None:
    memories.sync("pref", "likes green tea", embed=True, metadata={"kind": "preference", "score": 3})
    memories.sync("pref", "likes black tea", embed=True, metadata={"kind": "fact"})

    record = memories.store.record("pref")
    assert record is not None and record.metadata == {"kind": "fact"}
    assert [old.metadata for old in memories.store.history("pref")] == [{"kind": "preference", "score": 3}]
    assert _chroma_labels(memories, "pref") == {"kind": "fact"}


def test_a_rollback_restores_the_metadata_of_the_version_it_restores(memories: Memories) -> None:
    memories.sync("pref", "likes green tea", embed=True, metadata={"kind": "preference", "score": 3})
    memories.sync("pref", "likes black tea", embed=True, metadata={"kind": "fact"})

    result = memories.rollback("pref")

    assert result.current is not None and result.current.metadata == {"kind": "preference", "score": 3}
    assert _chroma_labels(memories, "pref") == {"kind": "preference", "score": 3}
    assert _found(memories, {"kind": "preference"}) == ["pref"]
    assert _found(memories, {"kind": "fact"}) == []


def test_a_metadata_only_change_makes_no_embedding_request_and_relabels_the_vector(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    memories.sync("pref", "likes green tea", embed=True, metadata={"kind": "preference", "old": "yes"})
    before = len(embedding_service.embedding_requests)

    result = memories.sync("pref", "likes green tea", embed=True, metadata={"kind": "fact"})

    assert len(embedding_service.embedding_requests) == before
    assert result.current is not None and result.current.version == 2
    assert _chroma_labels(memories, "pref") == {"kind": "fact"}  # the field it lost is gone from Chroma too
    assert [hit.version for hit in memories.search("green tea", where={"kind": "fact"})] == [2]
    assert _found(memories, {"old": "yes"}) == []


def test_the_same_value_with_other_metadata_is_not_unchanged(memories: Memories) -> None:
    memories.sync("pref", "likes tea", embed=True, metadata={"kind": "a"})
    [same, other] = memories.sync_many(
        [SyncItem("pref", "likes tea", embed=True, metadata={"kind": "a"})], skip_unchanged=True
    ) + memories.sync_many(
        [SyncItem("pref", "likes tea", embed=True, metadata={"kind": "b"})], skip_unchanged=True
    )
    assert not isinstance(same, Exception) and same.outcome == "unchanged"
    assert not isinstance(other, Exception) and other.outcome == "applied"


def test_reconcile_restores_metadata_on_vectors_that_lost_it(memories: Memories) -> None:
    memories.sync("pref", "likes tea", embed=True, metadata={"kind": "fact"})
    memories.index.delete([KeyRef(NS, "pref")])

    reconcile(memories, [NS])

    assert _chroma_labels(memories, "pref") == {"kind": "fact"}
    assert _found(memories, {"kind": "fact"}) == ["pref"]


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        (["kind"], "must be an object"),
        ({"kind": None}, "'kind': a null"),
        ({"kind": ["a"]}, "'kind': a list"),
        ({"kind": {"nested": 1}}, "'kind': a dict"),
        ({"$kind": "a"}, "field name '$kind'"),
        ({"": "a"}, "field name ''"),
        ({"n": float("inf")}, "not a finite number"),
        ({"n": 2**70}, "64-bit range"),
        ({"s": "x" * 2000}, "the limit is 1024"),
        ({f"f{n}": n for n in range(40)}, "40 fields"),
    ],
)
def test_bad_metadata_is_refused_with_its_problem_and_nothing_is_written(
    memories: Memories, metadata: Any, problem: str
) -> None:
    with pytest.raises(InvalidMetadata, match=problem.replace("$", r"\$")):
        memories.sync("pref", "likes tea", embed=True, metadata=metadata)
    assert memories.store.record("pref") is None


# Filters.


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({"kind": "fact"}, ["cat", "dog"]),
        ({"kind": {"$eq": "episode"}}, ["parrot"]),
        ({"kind": {"$ne": "fact"}}, None),  # by Chroma's own rule for keys without the field: checked below
        ({"legs": {"$gt": 2}}, ["cat", "dog"]),
        ({"legs": {"$gte": 2}}, ["cat", "dog", "parrot"]),
        ({"weight": {"$lt": 2.0}}, ["parrot"]),
        ({"weight": {"$lte": 2.0}}, ["parrot", "snake"]),
        ({"kind": {"$in": ["episode", "preference"]}}, ["parrot", "snake"]),
        ({"kind": {"$nin": ["fact"]}}, None),
        ({"indoor": True}, ["cat", "parrot"]),
        ({"$and": [{"kind": "fact"}, {"weight": {"$lt": 10}}]}, ["cat"]),
        ({"$or": [{"kind": "episode"}, {"legs": 0}]}, ["parrot", "snake"]),
        ({"kind": "fact", "indoor": False}, ["dog"]),
    ],
)
def test_search_filters_on_metadata_with_each_operator(
    pets: Memories, search_path: str, where: Any, expected: Any
) -> None:
    from kvstore.filters import check_where, matches

    by_python = sorted(key for key, (_, meta) in PETS.items() if matches(check_where(where), meta))
    assert _found(pets, where) == (expected if expected is not None else by_python)
    assert by_python == _found(pets, where)  # listing's evaluation agrees with Chroma's


@pytest.mark.parametrize(
    ("where", "problem"),
    [
        ({"kind": {"$regex": "f.*"}}, "$regex"),
        ({"kind": {"$in": []}}, "$in"),
        ({"legs": {"$gt": "two"}}, "$gt"),
        ({"$and": {"kind": "fact"}}, "$and"),
        ({"$or": "kind"}, "$or"),
        ({"kind": {"$eq": ["a"]}}, "$eq"),
        ("kind = fact", "where"),
    ],
)
def test_a_malformed_filter_is_refused_before_anything_is_sent(
    pets: Memories, embedding_service: EmbeddingServer, where: Any, problem: str
) -> None:
    before = len(embedding_service.embedding_requests)
    with pytest.raises(InvalidFilter, match=problem.replace("$", r"\$")):
        pets.search("pet", where=where)
    assert len(embedding_service.embedding_requests) == before


# What a hit tells.


def test_a_hit_carries_its_metadata(pets: Memories) -> None:
    [hit] = pets.search("cat", k=1, where={"kind": "fact", "indoor": True})
    assert (hit.key, dict(hit.metadata), hit.chunk, hit.span) == ("cat", PETS["cat"][1], None, None)


def test_min_score_drops_weak_hits(pets: Memories) -> None:
    hits = pets.search("the pet is a cat", k=5)
    strong = hits[0].score
    assert [h.key for h in pets.search("the pet is a cat", k=5, min_score=strong - 1e-6)] == ["cat"]
    assert pets.search("the pet is a cat", k=5, min_score=-1.0) == hits
    assert pets.search("unrelated words entirely", k=5, min_score=0.99) == []


@pytest.mark.parametrize("min_score", [1.5, -2, float("nan"), "high", True])
def test_a_bad_min_score_is_refused(pets: Memories, min_score: Any) -> None:
    with pytest.raises(InvalidQuery, match="min_score"):
        pets.search("pet", min_score=min_score)


# Listing without a query.


def test_listing_pages_through_the_memories_that_match_in_key_order(memories: Memories) -> None:
    items = [
        SyncItem(
            f"m{n:03d}", f"memory {n}", embed=n % 2 == 0, metadata={"kind": "even" if n % 2 == 0 else "odd"}
        )
        for n in range(45)
    ]
    memories.sync_many(items)
    memories.store.delete("m002")

    pages, cursor = [], None
    while True:
        page = list_memories(memories.store, NS, {"kind": "even"}, limit=10, cursor=cursor)
        pages.append([record.key for record in page.memories])
        if page.cursor is None:
            break
        cursor = page.cursor

    keys = [key for page in pages for key in page]
    assert keys == [f"m{n:03d}" for n in range(0, 45, 2) if n != 2]
    assert all(len(page) == 10 for page in pages[:-1])
    assert all(record.metadata == {"kind": "even"} for record in page_records(memories))


def page_records(memories: Memories) -> list[Any]:
    return list_memories(memories.store, NS, {"kind": "even"}, limit=1000).memories


def test_listing_without_a_filter_gives_every_current_memory_and_leaves_out_expired_ones(
    memories: Memories,
) -> None:
    memories.sync("a", "one")
    memories.sync("b", "two", ttl_ms=1)
    memories.sync("c", "three", metadata={"kind": "x"})
    import time

    time.sleep(0.05)
    page = list_memories(memories.store, NS)
    assert [(r.key, r.value) for r in page.memories] == [("a", "one"), ("c", "three")]
    assert page.cursor is None


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 5000}, "limit"),
        ({"cursor": "%%%"}, "cursor"),
        ({"cursor": 5}, "cursor"),
    ],
)
def test_listing_refuses_a_bad_limit_or_cursor(memories: Memories, arguments: Any, problem: str) -> None:
    with pytest.raises(InvalidFilter, match=problem):
        list_memories(memories.store, NS, **arguments)


def test_a_vector_whose_labels_disagree_with_the_record_is_no_hit_for_the_filter(memories: Memories) -> None:
    memories.sync("plan", "the user pays for the plan", embed=True, metadata={"tier": "free"})
    entry = memories.index.stored([KeyRef(NS, "plan")])[KeyRef(NS, "plan")]
    # The same version number labelled with other metadata: what a key re-created after its expiry
    # can meet before its index step runs.
    memories.index.relabel(
        [IndexEntry(NS, "plan", entry.version, entry.content_hash, metadata={"tier": "gold"})]
    )

    assert memories.search("plan", where={"tier": "gold"}) == []
    assert [hit.key for hit in memories.search("plan")] == ["plan"]


@pytest.mark.parametrize("rare", [1, 3, 30])
def test_a_filter_that_keeps_few_of_a_namespace_filling_its_shard_still_finds_them_all(
    memories: Memories, search_path: str, rare: int
) -> None:
    items = [
        SyncItem(f"m{n:03d}", f"note {n} about the garden", embed=True, metadata={"rare": n % 200 < rare})
        for n in range(200)
    ]
    assert not [r for r in memories.sync_many(items) if isinstance(r, Exception)]

    hits = memories.search("garden note", k=10, where={"rare": True})

    assert len(hits) == min(rare, 10) and all(hit.metadata == {"rare": True} for hit in hits)
    if rare <= 10:  # every one of them
        assert sorted(hit.key for hit in hits) == [f"m{n:03d}" for n in range(rare)]
