"""What Memories and the embedders report to their Observer, over real Redis, Chroma and the test server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

from kvstore import MemoryStore
from tests.conftest import API_KEY
from tests.support.embedding_server import EmbeddingServer, tokens
from vectorstore import (
    EmbeddingRejected,
    Memories,
    Observer,
    OpenAIEmbedder,
    SyncItem,
    VectorIndex,
    chroma_client,
)
from vectorstore.local_model import LocalMiniLM

MODEL = "test-embedding"


@dataclass
class Tally(Observer):
    """Adds up what it hears, as a metrics library would."""

    requests: list[tuple[str, int, int | None, str]] = field(default_factory=list)
    skipped: int = 0
    stale: int = 0

    def embedding_request(
        self, embedder: str, inputs: int, tokens: int | None, error: Exception | None = None
    ) -> None:
        self.requests.append((embedder, inputs, tokens, type(error).__name__ if error else "ok"))

    def embeddings_skipped(self, inputs: int) -> None:
        self.skipped += inputs

    def stale_hits_dropped(self, hits: int) -> None:
        self.stale += hits


@pytest.fixture
def tally() -> Tally:
    return Tally()


@pytest.fixture
def memories(
    redis_client: redis.Redis, chroma_url: str, prefix: str, embedding_service: EmbeddingServer, tally: Tally
) -> Iterator[Memories]:
    store = MemoryStore(redis_client, prefix=prefix)
    index = VectorIndex(chroma_client(chroma_url), model=MODEL, dimensions=None, prefix=prefix)
    embedder = OpenAIEmbedder(
        api_key=API_KEY, model=MODEL, base_url=embedding_service.base_url, observer=tally
    )
    yield Memories(store, index, embedder, observer=tally)
    embedder.close()
    index.drop_all()


def test_an_embedding_request_reports_its_inputs_and_the_servers_token_count(
    memories: Memories, tally: Tally
) -> None:
    texts = ["the user has a black cat", "she works at a trading desk"]
    memories.sync_many([SyncItem(f"k{n}", text, embed=True) for n, text in enumerate(texts)])
    assert tally.requests == [("openai", 2, sum(len(tokens(text)) for text in texts), "ok")]


def test_a_text_the_index_already_holds_is_reported_skipped_and_not_embedded(
    memories: Memories, tally: Tally
) -> None:
    memories.sync("pet", "the user has a black cat", embed=True)
    memories.sync("pet", "the user has a black cat", embed=True)
    memories.sync("pet", "the user has a grey cat", embed=True)
    assert (len(tally.requests), tally.skipped) == (2, 1)


def test_a_refused_request_is_reported_with_its_error_and_no_tokens(
    memories: Memories, tally: Tally, embedding_service: EmbeddingServer
) -> None:
    embedding_service.fail_next(400)
    with pytest.raises(EmbeddingRejected):
        memories.sync("pet", "the user has a black cat", embed=True)
    assert tally.requests == [("openai", 1, None, "EmbeddingRejected")]


def test_a_search_reports_the_stale_and_deleted_hits_it_drops(memories: Memories, tally: Tally) -> None:
    for n in range(4):
        memories.sync(f"cat-{n}", f"a cat named number {n}", embed=True)
    # Redis moves on while the index lags behind (as when a worker dies between the two steps).
    memories.store.set("cat-0", "a parrot now", embed=True, content_hash="not-the-indexed-one")
    memories.store.delete("cat-1")
    hits = memories.search("a cat", k=10)
    assert sorted(hit.key for hit in hits) == ["cat-2", "cat-3"]
    assert tally.stale == 2


def test_a_search_with_only_current_hits_reports_none_dropped(memories: Memories, tally: Tally) -> None:
    memories.sync("pet", "the user has a black cat", embed=True)
    assert [hit.key for hit in memories.search("cat", k=3)] == ["pet"]
    assert tally.stale == 0


def test_the_local_model_reports_each_call_as_one_request_of_its_inputs_without_tokens(tally: Tally) -> None:
    model = LocalMiniLM(observer=tally)
    model.embed(["one text", "another text", "a third"])
    model.embed([])
    assert tally.requests == [("local", 3, None, "ok")]
