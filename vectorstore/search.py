"""Search by meaning, joined with Redis so that only current values come back."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kvstore import MemoryStore, Record, check_namespace
from vectorstore.embedder import Embedder
from vectorstore.errors import EmbeddingUnavailable, IndexUnavailable, InvalidQuery
from vectorstore.index import IndexEntry, VectorIndex
from vectorstore.observer import NO_OBSERVER, Observer

__all__ = ["MAX_K", "Hit", "search"]

MAX_K = 1000
#: The first pause between two tries of a search step; it doubles, within the retry budget.
FIRST_PAUSE_MS = 50
T = TypeVar("T")


@dataclass(frozen=True)
class Hit:
    """A current memory close in meaning to the query; `score` is cosine similarity, higher is closer."""

    key: str
    value: Any
    score: float
    version: int
    namespace: str
    updated_at_ms: int  # when this version was written, ms since the epoch


def search(
    query: str,
    k: int = 5,
    namespace: str | None = None,
    where: dict[str, Any] | None = None,
    *,
    store: MemoryStore,
    index: VectorIndex,
    embedder: Embedder,
    retry_budget_ms: int = 2_000,
    observer: Observer = NO_OBSERVER,
) -> list[Hit]:
    """The `k` current memories of a namespace closest in meaning to `query`, closest first.

    One query embedding, one Chroma query and one Redis read in the common case. Index entries
    whose version is not the key's current one, or whose key is gone, are dropped, and the index
    is asked for more until `k` current hits are found or it has no more. An embedding or Chroma
    failure worth retrying is tried again, with doubling pauses (or the server's Retry-After),
    until `retry_budget_ms` has passed; then it is raised.
    """
    ns = check_namespace(namespace)
    _check_query(query, k)
    retry = _Retrying(retry_budget_ms)
    vector = retry(lambda: embedder.embed([query])[0])
    wanted = k + 10
    while True:
        entries = retry(functools.partial(index.query, ns, vector, wanted, where))
        hits = _current(entries, store.records([e.key for e in entries], namespace=ns), ns)
        if len(hits) >= k or len(entries) < wanted:
            if len(entries) > len(hits):  # the last round read every entry the earlier ones did
                observer.stale_hits_dropped(len(entries) - len(hits))
            return hits[:k]
        wanted *= 2


class _Retrying:
    """Runs a step again after a transient failure while the search's budget lasts."""

    def __init__(self, budget_ms: int) -> None:
        self.deadline = time.monotonic() + budget_ms / 1000
        self.pause_ms = FIRST_PAUSE_MS

    def __call__(self, step: Callable[[], T]) -> T:
        while True:
            try:
                return step()
            except (EmbeddingUnavailable, IndexUnavailable) as error:
                pause_s = self._pause_ms(error) / 1000
                if time.monotonic() + pause_s > self.deadline:
                    raise
                time.sleep(pause_s)
                self.pause_ms *= 2

    def _pause_ms(self, error: Exception) -> int:
        asked = error.retry_after_ms if isinstance(error, EmbeddingUnavailable) else None
        return max(self.pause_ms, asked or 0)


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
            score = 1.0 - entry.distance
            hits.append(Hit(entry.key, record.value, score, record.version, namespace, record.at_ms))
    return hits


def _is_current(entry: IndexEntry, record: Record) -> bool:
    fresh = entry.version == record.version and entry.content_hash == record.content_hash
    return fresh and record.embed and not record.deleted
