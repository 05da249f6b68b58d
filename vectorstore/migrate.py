"""Carry vectors from another layout into this index's shard collections, with no new embedding.

The other layouts of the same model and dimensions: the one before shards (a collection per
namespace), and shards of another count (after MEMSYNC_INDEX_SHARDS changed). Each old collection
is copied page by page (vectors, versions and hashes as they are) and deleted only once all of it
is in the shards, so a migration that is stopped halfway is finished by running it again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from chromadb.api.models.Collection import Collection

from vectorstore.index import IndexEntry, VectorIndex, collection_name, shard_name, translated

__all__ = ["Migrated", "legacy_collections", "migrate_legacy"]

_PAGE = 500


@dataclass(frozen=True)
class Migrated:
    """One old collection carried over: its name and how many vectors it held."""

    collection: str
    vectors: int


def legacy_collections(index: VectorIndex) -> list[Collection]:
    """The collections of this index's model and dimensions in another layout."""
    with translated():
        collections = index.client.list_collections()
    return [c for c in collections if _is_legacy(index, c)]


def migrate_legacy(index: VectorIndex) -> list[Migrated]:
    """Copy every old per-namespace collection into the shards, then delete it; what was carried over."""
    done = []
    for collection in legacy_collections(index):
        namespace = str((collection.metadata or {}).get("namespace", ""))
        copied = sum(_copy(index, namespace, page) for page in _pages(collection))
        with translated():
            index.client.delete_collection(collection.name)
        done.append(Migrated(collection.name, copied))
    return done


def _is_legacy(index: VectorIndex, collection: Collection) -> bool:
    metadata = collection.metadata or {}
    namespace = metadata.get("namespace")
    if isinstance(namespace, str) and "shard" not in metadata:
        return collection.name == collection_name(index.prefix, index.model, index.dimensions, namespace)
    shard, shards = metadata.get("shard"), metadata.get("shards")
    if not isinstance(shard, int) or not isinstance(shards, int) or shards == index.shards:
        return False
    return collection.name == shard_name(index.prefix, index.model, index.dimensions, shard, shards)


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
        IndexEntry(
            str(meta.get("namespace", namespace)), str(meta["key"]), int(meta["version"]), str(meta["hash"])
        )
        for meta in page["metadatas"]
    ]
    index.upsert(entries, np.asarray(page["embeddings"], dtype=np.float32))
    return len(entries)
