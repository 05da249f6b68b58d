"""Carry vectors from the layout before shards (a collection per namespace) into the shard collections.

Each old collection is copied page by page (vectors, versions and hashes as they are, no new
embedding) and deleted only once all of it is in the shards, so a migration that is stopped
halfway is finished by running it again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from chromadb.api.models.Collection import Collection

from vectorstore.index import IndexEntry, VectorIndex, collection_name, translated

__all__ = ["Migrated", "legacy_collections", "migrate_legacy"]

_PAGE = 500


@dataclass(frozen=True)
class Migrated:
    """One old collection carried over: its namespace and how many vectors it held."""

    namespace: str
    vectors: int


def legacy_collections(index: VectorIndex) -> list[Collection]:
    """The per-namespace collections of this index's model and dimensions, in the layout before shards."""
    with translated():
        collections = index.client.list_collections()
    return [c for c in collections if _is_legacy(index, c)]


def migrate_legacy(index: VectorIndex) -> list[Migrated]:
    """Copy every old per-namespace collection into the shards, then delete it; what was carried over."""
    done = []
    for collection in legacy_collections(index):
        namespace = str((collection.metadata or {})["namespace"])
        copied = sum(_copy(index, namespace, page) for page in _pages(collection))
        with translated():
            index.client.delete_collection(collection.name)
        done.append(Migrated(namespace, copied))
    return done


def _is_legacy(index: VectorIndex, collection: Collection) -> bool:
    metadata = collection.metadata or {}
    namespace = metadata.get("namespace")
    if not isinstance(namespace, str) or "shard" in metadata:
        return False
    return collection.name == collection_name(index.prefix, index.model, index.dimensions, namespace)


def _pages(collection: Collection) -> Iterator[Any]:
    offset = 0
    while True:
        with translated():
            page = collection.get(include=["embeddings", "metadatas"], limit=_PAGE, offset=offset)
        if not page["ids"]:
            return
        yield page
        offset += len(page["ids"])


def _copy(index: VectorIndex, namespace: str, page: Any) -> int:
    entries = [
        IndexEntry(namespace, str(meta["key"]), int(meta["version"]), str(meta["hash"]))
        for meta in page["metadatas"]
    ]
    index.upsert(entries, np.asarray(page["embeddings"], dtype=np.float32))
    return len(entries)
