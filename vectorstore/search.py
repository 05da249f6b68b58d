"""Search by meaning, joined with Redis so that only current values come back."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvstore import MemoryStore, Record, Scalar, check_namespace
from kvstore.filters import check_where, matches
from vectorstore.embedder import Embedder
from vectorstore.errors import EmbeddingUnavailable, IndexUnavailable, InvalidQuery
from vectorstore.index import IndexEntry, VectorIndex, Vectors
from vectorstore.observer import NO_OBSERVER, Observer

__all__ = ["DOMINANT_SHARE", "MAX_K", "MAX_NEAREST", "Hit", "search"]

MAX_K = 1000
#: The first pause between two tries of a search step; it doubles, within the retry budget.
FIRST_PAUSE_MS = 50
T = TypeVar("T")


@dataclass(frozen=True)
class Hit:
    """A current memory close in meaning to the query; `score` is cosine similarity, higher is closer.

    A key whose text was embedded as several chunks is scored by its closest chunk: `chunk` is its
    number and `span` its character offsets in the text (`text[start:end]`); both None for one chunk.
    """

    key: str
    value: Any
    score: float
    version: int
    namespace: str
    updated_at_ms: int  # when this version was written, ms since the epoch
    metadata: Mapping[str, Scalar] = field(default_factory=dict, hash=False)
    chunk: int | None = None
    span: tuple[int, int] | None = None


def search(
    query: str,
    k: int = 5,
    namespace: str | None = None,
    where: Mapping[str, Any] | None = None,
    *,
    min_score: float | None = None,
    store: MemoryStore,
    index: VectorIndex,
    embedder: Embedder,
    retry_budget_ms: int = 2_000,
    observer: Observer = NO_OBSERVER,
) -> list[Hit]:
    """The `k` current memories of a namespace closest in meaning to `query`, closest first.

    One query embedding, one Chroma query and one Redis read in the common case. Index entries
    whose version is not the key's current one, or whose key is gone, are dropped, a key's other
    chunks after its closest one too, and the index is asked for more until `k` current hits are
    found or it has no more. `where` filters on the memories' metadata (`kvstore.filters`);
    `min_score` drops hits less similar than it. An embedding or Chroma failure worth retrying is
    tried again, with doubling pauses (or the server's Retry-After), until `retry_budget_ms` has
    passed; then it is raised.

    Chroma's filtered query costs time in proportion to the vectors the filter keeps in the shard
    (BENCHMARKS.md: 289 ms for a namespace of 100,000 that fills its shard, 10 ms with no filter),
    so a namespace that holds most of its shard is searched with no filter sent to Chroma: the
    nearest vectors of the shard, filtered in the Redis join (`_nearest_then_filter`), asking
    for more once by the share that passed, and Chroma's filter only when too few would.
    """
    ns = check_namespace(namespace)
    _check_query(query, k, min_score)
    plan = _Plan(ns, k, check_where(where), min_score, store, index, _Retrying(retry_budget_ms))
    vector = plan.retry(lambda: embedder.embed([query])[0])
    hits = None
    keys = store.count_keys(ns)
    if plan.retry(lambda: index.share(ns, keys)) >= DOMINANT_SHARE:
        hits = _nearest_then_filter(plan, vector)
    if hits is None:
        hits = _filtered_by_chroma(plan, vector)
    if plan.stale:
        observer.stale_hits_dropped(plan.stale)
    return hits


#: A namespace with at least this share of its shard's vectors is searched without Chroma's filter.
DOMINANT_SHARE = 0.5
#: The most vectors a search without Chroma's filter asks for before it lets Chroma filter instead.
MAX_NEAREST = 1000


@dataclass
class _Plan:
    """One search's question and what it found so far."""

    namespace: str
    k: int
    where: Mapping[str, Any] | None
    min_score: float | None
    store: MemoryStore
    index: VectorIndex
    retry: _Retrying
    stale: int = 0

    def hits(self, entries: list[IndexEntry], asked: int) -> tuple[list[Hit], bool]:
        """The current hits among `entries`, and whether they answer the search.

        Entries of other namespaces, and those whose labels fail the filter, are left out before the
        Redis join (a current vector carries its version's metadata); the join checks the rest.
        """
        mine = [e for e in entries if e.namespace == self.namespace and matches(self.where, e.metadata)]
        records = self.store.records(_keys(mine), namespace=self.namespace)
        hits, self.stale = _current(mine, records, self.namespace, self.where)
        weak = self.min_score is not None and bool(entries) and 1.0 - entries[-1].distance < self.min_score
        return hits, len(hits) >= self.k or len(entries) < asked or weak

    def answer(self, hits: list[Hit]) -> list[Hit]:
        return [hit for hit in hits if self.min_score is None or hit.score >= self.min_score][: self.k]


def _filtered_by_chroma(plan: _Plan, vector: Vectors) -> list[Hit]:
    """Ask Chroma for the namespace's nearest vectors that match the filter, more until `k` hits."""
    wanted = plan.k + 10
    while True:
        query = functools.partial(plan.index.query, plan.namespace, vector, wanted, plan.where)
        hits, done = plan.hits(plan.retry(query), wanted)
        if done:
            return plan.answer(hits)
        wanted *= 2


def _nearest_then_filter(plan: _Plan, vector: Vectors) -> list[Hit] | None:
    """The shard's nearest vectors, filtered here; None when too few pass (Chroma's filter then)."""
    wanted = plan.k + 10 if plan.where is None else max(100, 2 * plan.k)
    for _ in range(2):
        query = functools.partial(plan.index.nearest, plan.namespace, vector, wanted)
        entries = plan.retry(query)
        hits, done = plan.hits(entries, wanted)
        if done:
            return plan.answer(hits)
        if not hits:
            return None
        wanted = math.ceil(plan.k * len(entries) / len(hits) * 1.5)  # by the share that passed
        if wanted > MAX_NEAREST:
            return None
    return None


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


def _check_query(query: object, k: object, min_score: object) -> None:
    if not isinstance(query, str) or not query.strip():
        raise InvalidQuery("query must be a non-empty string")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise InvalidQuery(f"k must be an integer from 1 to {MAX_K}")
    if min_score is None:
        return
    if not isinstance(min_score, int | float) or isinstance(min_score, bool) or not math.isfinite(min_score):
        raise InvalidQuery("min_score must be a number from -1 to 1")
    if not -1.0 <= min_score <= 1.0:
        raise InvalidQuery(f"min_score must be a number from -1 to 1, not {min_score}")


def _keys(entries: list[IndexEntry]) -> list[str]:
    return list(dict.fromkeys(entry.key for entry in entries))


def _current(
    entries: list[IndexEntry], records: dict[str, Record], namespace: str, where: Mapping[str, Any] | None
) -> tuple[list[Hit], int]:
    """The hits of current entries, each key once (by its closest chunk); and how many entries were stale.

    The filter is checked again on the record (the truth): a vector labelled with a version's
    metadata that a later write of the same version number replaced is not a hit.
    """
    hits: dict[str, Hit] = {}
    stale = 0
    for entry in entries:
        record = records.get(entry.key)
        if record is None or not _is_current(entry, record) or not matches(where, record.metadata):
            stale += 1
        elif entry.key not in hits:
            hits[entry.key] = _hit(entry, record, namespace)
    return list(hits.values()), stale


def _hit(entry: IndexEntry, record: Record, namespace: str) -> Hit:
    chunk = entry.chunk if entry.chunks > 1 else None
    return Hit(
        entry.key, record.value, 1.0 - entry.distance, record.version, namespace, record.at_ms,
        record.metadata, chunk, entry.span if chunk is not None else None,
    )  # fmt: skip


def _is_current(entry: IndexEntry, record: Record) -> bool:
    fresh = entry.version == record.version and entry.content_hash == record.content_hash
    return fresh and record.embed and not record.deleted
