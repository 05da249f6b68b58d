"""vectorstore: embeddings, the Chroma index kept in step with kvstore, and search by meaning."""

from __future__ import annotations

from vectorstore.embedder import Embedder, OpenAIEmbedder
from vectorstore.errors import (
    EmbeddingRejected,
    EmbeddingUnavailable,
    IndexUnavailable,
    LocalModelMissing,
    VectorStoreError,
)
from vectorstore.index import IndexEntry, VectorIndex, chroma_client, collection_name
from vectorstore.local_model import LocalMiniLM
from vectorstore.search import Hit, InvalidQuery, search
from vectorstore.sync import ItemResult, Memories, SyncItem

__all__ = [
    "Embedder",
    "EmbeddingRejected",
    "EmbeddingUnavailable",
    "Hit",
    "IndexEntry",
    "IndexUnavailable",
    "InvalidQuery",
    "ItemResult",
    "LocalMiniLM",
    "LocalModelMissing",
    "Memories",
    "OpenAIEmbedder",
    "SyncItem",
    "VectorIndex",
    "VectorStoreError",
    "chroma_client",
    "collection_name",
    "search",
]
