"""Fixtures of the vectorstore tests: Memories over the test services."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from kvstore import MemoryStore
from tests.conftest import API_KEY
from tests.support.embedding_server import EmbeddingServer
from vectorstore import Memories, OpenAIEmbedder, VectorIndex, chroma_client

#: The model name the test embedding server answers for.
MODEL = "test-embedding"


@pytest.fixture
def memories(
    redis_client: redis.Redis, chroma_url: str, prefix: str, embedding_service: EmbeddingServer
) -> Iterator[Memories]:
    """Memories of this test's own prefix: real Redis and Chroma, the openai SDK against the test server."""
    store = MemoryStore(redis_client, prefix=prefix, history_length=5)
    index = VectorIndex(chroma_client(chroma_url), model=MODEL, dimensions=None, prefix=prefix)
    embedder = OpenAIEmbedder(api_key=API_KEY, model=MODEL, base_url=embedding_service.base_url)
    yield Memories(store, index, embedder)
    index.drop_all()
    embedder.close()
