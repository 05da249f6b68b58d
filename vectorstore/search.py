"""Search by meaning, joined with Redis so that only current values come back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvstore import MemoryStore, Record, check_namespace
from vectorstore.embedder import Embedder
from vectorstore.errors import VectorStoreError
from vectorstore.index import IndexEntry, VectorIndex

__all__ = ["MAX_K", "Hit", "InvalidQuery", "search"]

MAX_K = 1000


class InvalidQuery(VectorStoreError):
    """Raised when a search's query text, k or filter is unusable."""


@dataclass(frozen=True)
class Hit:
    """A current memory close in meaning to the query; `score` is cosine similarity, higher is closer."""

    key: str
    value: Any
    score: float
    version: int
    namespace: str


def search(
    query: str,
    k: int = 5,
    namespace: str | None = None,
    where: dict[str, Any] | None = None,
    *,
    store: MemoryStore,
    index: VectorIndex,
    embedder: Embedder,
) -> list[Hit]:
    """The `k` current memories of a namespace closest in meaning to `query`, closest first.

    Index entries whose version is not the key's current one, or whose key is gone, are dropped,
    and the index is asked for more until `k` current hits are found or it has no more.
    """
    ns = check_namespace(namespace)
    _check_query(query, k)
    vector = embedder.embed([query])[0]
    wanted = k + 10
    while True:
        entries = index.query(ns, vector, wanted, where)
        hits = _current(entries, store.records([e.key for e in entries], namespace=ns), ns)
        if len(hits) >= k or len(entries) < wanted:
            return hits[:k]
        wanted *= 2


def _check_query(query: object, k: object) -> None:
    if not isinstance(query, str) or not query.strip():
        raise InvalidQuery("query must be a non-empty string")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise InvalidQuery(f"k must be an integer from 1 to {MAX_K}")


def _current(entries: list[IndexEntry], records: dict[str, Record], namespace: str) -> list[Hit]:
    hits = []
    for entry in entries:
        record = records.get(entry.key)
        if record is not None and _is_current(entry, record):
            hits.append(Hit(entry.key, record.value, 1.0 - entry.distance, record.version, namespace))
    return hits


def _is_current(entry: IndexEntry, record: Record) -> bool:
    fresh = entry.version == record.version and entry.content_hash == record.content_hash
    return fresh and record.embed and not record.deleted
