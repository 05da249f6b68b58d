"""vectorstore: embeddings, the Chroma index kept in step with kvstore, and search by meaning.

The errors load with the package; the rest (chromadb, openai) on first use, so that a program
that only names the errors, or a CLI's `--help`, does not pay for those imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vectorstore.errors import (
    EmbeddingRejected,
    EmbeddingUnavailable,
    IndexUnavailable,
    InvalidQuery,
    LocalModelMissing,
    VectorStoreError,
)
from vectorstore.observer import NO_OBSERVER, Observer

if TYPE_CHECKING:
    from vectorstore.chunks import Chunk, Chunker
    from vectorstore.embedder import Embedder, OpenAIEmbedder
    from vectorstore.index import IndexEntry, VectorIndex, chroma_client, collection_name
    from vectorstore.local_model import LocalMiniLM
    from vectorstore.search import Hit, search
    from vectorstore.sync import ItemResult, Memories, SyncItem

__all__ = [
    "NO_OBSERVER",
    "Chunk",
    "Chunker",
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
    "Observer",
    "OpenAIEmbedder",
    "SyncItem",
    "VectorIndex",
    "VectorStoreError",
    "chroma_client",
    "collection_name",
    "search",
]

_MODULES = {
    "Chunk": "chunks",
    "Chunker": "chunks",
    "Embedder": "embedder",
    "OpenAIEmbedder": "embedder",
    "IndexEntry": "index",
    "VectorIndex": "index",
    "chroma_client": "index",
    "collection_name": "index",
    "LocalMiniLM": "local_model",
    "Hit": "search",
    "search": "search",
    "ItemResult": "sync",
    "Memories": "sync",
    "SyncItem": "sync",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'vectorstore' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vectorstore.{module}"), name)
