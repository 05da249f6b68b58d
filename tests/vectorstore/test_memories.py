"""Memories over real Redis, a real Chroma server and the openai SDK against the test server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from kvstore import InvalidValue, KeyRef, MemoryStore, WriteMeta
from tests.conftest import API_KEY
from tests.support.embedding_server import EmbeddingServer
from tests.support.services import start_chroma
from vectorstore import (
    EmbeddingUnavailable,
    IndexEntry,
    IndexUnavailable,
    InvalidQuery,
    Memories,
    OpenAIEmbedder,
    VectorIndex,
    chroma_client,
)
from vectorstore.reconcile import reconcile

MODEL = "test-embedding"


def _embedding_calls(server: EmbeddingServer) -> int:
    return len(server.embedding_requests)


def test_a_synced_memory_is_found_by_meaning(memories: Memories) -> None:
    memories.sync("pet", "the user has a black cat named Tom", embed=True)
    memories.sync("job", "works at a stock market trading desk", embed=True)
    hits = memories.search("what cat does the user have", k=2)
    assert [hit.key for hit in hits] == ["pet", "job"]
    assert hits[0].value == "the user has a black cat named Tom"
    assert hits[0].score > hits[1].score
    assert hits[0].version == 1


def test_search_never_returns_a_value_that_is_not_current(memories: Memories) -> None:
    memories.sync("pet", "the user has a cat", embed=True)
    for n in range(3):
        memories.sync(f"other-{n}", f"cat toys number {n}", embed=True)
    # Redis moves on while the index lags behind (as when a worker dies between the two steps).
    memories.store.set("pet", "the user has a parrot", embed=True, content_hash="not-the-indexed-one")
    hits = memories.search("cat", k=3)
    assert "pet" not in [hit.key for hit in hits]
    assert len(hits) == 3


def test_search_drops_hits_whose_key_is_gone(memories: Memories) -> None:
    memories.sync("pet", "the user has a cat", embed=True)
    memories.store.delete("pet")
    assert memories.search("cat", k=5) == []


def test_search_gives_k_current_hits_when_many_stale_ones_rank_higher(memories: Memories) -> None:
    for n in range(12):
        memories.sync(f"stale-{n}", "cat cat cat", embed=True)
        memories.store.set(f"stale-{n}", "moved on", embed=True, content_hash="elsewhere")
    for n in range(3):
        memories.sync(f"fresh-{n}", f"a cat and a dog {n}", embed=True)
    hits = memories.search("cat cat cat", k=3)
    assert sorted(hit.key for hit in hits) == ["fresh-0", "fresh-1", "fresh-2"]


def test_an_unchanged_text_is_not_embedded_again(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    memories.sync("pet", "the user has a cat", embed=True)
    calls = _embedding_calls(embedding_service)
    result = memories.sync("pet", "the user has a cat", embed=True)
    assert _embedding_calls(embedding_service) == calls
    assert result.current is not None and result.current.version == 2
    assert [hit.version for hit in memories.search("cat", k=1)] == [2]


def test_a_value_synced_without_embed_loses_its_vector(memories: Memories) -> None:
    memories.sync("pet", "the user has a cat", embed=True)
    memories.sync("pet", "no longer searchable", embed=False)
    assert memories.index.stored([KeyRef("default", "pet")]) == {}
    assert memories.search("cat", k=5) == []


def test_a_rollback_brings_the_restored_value_back_into_search(memories: Memories) -> None:
    memories.sync("pet", "the user has a cat", embed=True)
    memories.sync("pet", "the user has a parrot", embed=True)
    memories.rollback("pet")
    hits = memories.search("cat", k=1)
    assert [(hit.key, hit.value, hit.version) for hit in hits] == [("pet", "the user has a cat", 3)]


def test_search_is_scoped_to_a_namespace(memories: Memories) -> None:
    memories.sync("pet", "a cat", embed=True, namespace="user-1")
    memories.sync("pet", "a dog", embed=True, namespace="user-2")
    assert [hit.value for hit in memories.search("cat", namespace="user-2")] == ["a dog"]


def test_json_values_are_embedded_as_canonical_json(memories: Memories) -> None:
    memories.sync("prefs", {"theme": "dark", "font": "large"}, embed=True)
    assert memories.search("dark theme", k=1)[0].value == {"font": "large", "theme": "dark"}


def test_an_empty_string_cannot_be_embedded_and_nothing_is_written(memories: Memories) -> None:
    with pytest.raises(InvalidValue, match="nothing to embed"):
        memories.sync("k", "   ", embed=True)
    assert memories.store.record("k") is None


def test_an_older_message_skips_the_embedding_call(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    memories.sync("k", "newer text", embed=True, meta=WriteMeta("m-2", 2_000))
    calls = _embedding_calls(embedding_service)
    memories.sync("k", "older text", embed=True, meta=WriteMeta("m-1", 1_000))
    assert _embedding_calls(embedding_service) == calls
    assert memories.store.get("k") == "newer text"


@pytest.mark.parametrize(("query", "k"), [("", 5), ("  ", 5), ("cat", 0), ("cat", 1001)])
def test_an_unusable_query_is_refused(memories: Memories, query: str, k: int) -> None:
    with pytest.raises(InvalidQuery):
        memories.search(query, k=k)


def test_search_fails_clearly_when_chroma_is_unreachable(
    redis_client: redis.Redis, prefix: str, embedding_service: EmbeddingServer, tmp_path: Path
) -> None:
    chroma = start_chroma(tmp_path / "chroma")
    try:
        index = VectorIndex(chroma_client(chroma.url), model=MODEL, dimensions=None, prefix=prefix)
        embedder = OpenAIEmbedder(api_key=API_KEY, model=MODEL, base_url=embedding_service.base_url)
        memories = Memories(
            MemoryStore(redis_client, prefix=prefix), index, embedder, search_retry_budget_ms=0
        )
        memories.sync("k", "a memory", embed=True)
    finally:
        chroma.stop()
    with pytest.raises(IndexUnavailable, match="Chroma"):
        memories.search("a memory")


def test_reconcile_repairs_missing_stale_and_orphan_vectors(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    memories.sync("stale", "old text", embed=True)
    memories.sync("orphan", "soon gone", embed=True)
    memories.sync("relabel", "same text", embed=True)
    memories.store.set("missing", "never indexed", embed=True, content_hash=_hash("never indexed"))
    memories.store.set("stale", "new text", embed=True, content_hash=_hash("new text"))
    memories.store.set("relabel", "same text", embed=True, content_hash=_hash("same text"))
    memories.store.delete("orphan")
    calls = _embedding_calls(embedding_service)

    first = reconcile(memories, ["default"])
    assert first[0].counts() == {"missing": 1, "stale": 2, "orphan": 1}
    # One request for the two changed texts; "relabel" needs no new embedding.
    assert [r.inputs for r in embedding_service.embedding_requests[calls:]] == [2]
    assert reconcile(memories, ["default"])[0].counts() == {"missing": 0, "stale": 0, "orphan": 0}
    assert {hit.key for hit in memories.search("text", k=5)} == {"missing", "stale", "relabel"}


def test_the_index_can_be_rebuilt_from_redis(memories: Memories) -> None:
    memories.sync("pet", "a cat", embed=True)
    memories.index.drop("default")
    reconcile(memories, ["default"])
    pet = KeyRef("default", "pet")
    assert memories.index.stored([pet])[pet] == IndexEntry("default", "pet", 1, _hash("a cat"))


def _hash(text: str) -> str:
    from kvstore import content_hash

    return content_hash(text)


def test_search_retries_a_failing_embedding_server_within_its_budget(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    memories.sync("pet", "the user has a cat", embed=True)
    embedding_service.fail_next(503, count=2)
    assert [hit.key for hit in memories.search("cat", k=1)] == ["pet"]
    assert [r.status for r in embedding_service.embedding_requests[-3:]] == [503, 503, 200]


def test_search_honours_retry_after_within_its_budget(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    memories.sync("pet", "the user has a cat", embed=True)
    embedding_service.fail_next(429, retry_after_ms=300)
    started = time.monotonic()
    assert [hit.key for hit in memories.search("cat", k=1)] == ["pet"]
    assert time.monotonic() - started >= 0.3


def test_search_raises_once_its_retry_budget_is_spent(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    memories.sync("pet", "the user has a cat", embed=True)
    memories.search_retry_budget_ms = 300
    embedding_service.fail_next(503, count=50)
    started = time.monotonic()
    with pytest.raises(EmbeddingUnavailable):
        memories.search("cat", k=1)
    assert time.monotonic() - started < 1.0
    failed = [r for r in embedding_service.embedding_requests if r.status == 503]
    assert 2 <= len(failed) <= 4, "a few tries with doubling pauses, not one and not fifty"
