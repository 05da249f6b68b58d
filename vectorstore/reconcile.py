"""Reconcile: find and repair drift between Redis (the truth) and the Chroma index."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from kvstore import KeyRef, MemoryStore, Record, same_metadata
from vectorstore.index import IndexEntry, VectorIndex
from vectorstore.sync import Memories

__all__ = ["REPAIR_BATCH", "Drift", "drifts", "find_drift", "index_drift", "reconcile"]

#: Keys repaired per batch: one Redis read, one Chroma get and one embedding request each.
REPAIR_BATCH = 500


@dataclass
class Drift:
    """What differs in one namespace: keys with no vectors, out-of-date ones, or vectors with no key.

    A key is stale when any of its vectors has another version, hash or metadata than its record,
    or when its chunks are not exactly 0 to n-1 of the count the first one gives. Of those, the
    ones a repair from the first chunk cannot fix are `broken` (a subset): their chunks are not
    whole, or the first chunk agrees with the record while another does not.
    """

    namespace: str
    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    orphan: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"missing": len(self.missing), "stale": len(self.stale), "orphan": len(self.orphan)}


def find_drift(memories: Memories, namespace: str) -> Drift:
    """Compare every embedded current value of a namespace with the index's entries."""
    return index_drift(memories.store, memories.index, namespace)


def drifts(store: MemoryStore, index: VectorIndex, namespaces: list[str] | None = None) -> list[Drift]:
    """The drift of each namespace (all by default), found without an embedder: a dry-run reconcile."""
    names = namespaces if namespaces is not None else _all_namespaces(store, index)
    return [index_drift(store, index, namespace) for namespace in names]


def index_drift(store: MemoryStore, index: VectorIndex, namespace: str) -> Drift:
    """Compare every embedded current value of a namespace with the index's entries."""
    records = store.records(store.keys(namespace=namespace), namespace=namespace)
    wanted = {key: record for key, record in records.items() if record.embed and not record.deleted}
    indexed: dict[str, list[IndexEntry]] = defaultdict(list)
    for entry in index.entries(namespace):
        indexed[entry.key].append(entry)
    drift = Drift(namespace)
    both = set(wanted) & set(indexed)
    drift.missing = sorted(set(wanted) - set(indexed))
    drift.stale = sorted(key for key in both if _differs(wanted[key], indexed[key]))
    drift.broken = sorted(key for key in drift.stale if _beyond_repair(wanted[key], indexed[key]))
    drift.orphan = sorted(set(indexed) - set(wanted))
    return drift


def reconcile(memories: Memories, namespaces: list[str] | None = None, *, repair: bool = True) -> list[Drift]:
    """Find drift in each namespace (all by default) and, if `repair`, fix it; a second run finds none.

    Only missing and stale vectors are embedded again; a stale vector whose text did not change is
    relabelled without an embedding call.
    """
    found = drifts(memories.store, memories.index, namespaces)
    if repair:
        for drift in found:
            _repair(memories, drift)
    return found


def _repair(memories: Memories, drift: Drift) -> None:
    """Re-index missing and stale keys and drop orphans, in batches of `REPAIR_BATCH` keys.

    Every vector of an orphan or broken key is dropped first (by key, whatever its chunk count), so
    that a broken key is embedded whole again.
    """
    memories.index.delete([KeyRef(drift.namespace, key) for key in [*drift.broken, *drift.orphan]])
    refs = [KeyRef(drift.namespace, key) for key in [*drift.missing, *drift.stale]]
    for start in range(0, len(refs), REPAIR_BATCH):
        memories.refresh(refs[start : start + REPAIR_BATCH])


def _differs(record: Record, entries: list[IndexEntry]) -> bool:
    """Whether the chunks are not whole, or any has another version, hash or metadata than the record."""
    return not _whole(entries) or any(_label_differs(record, entry) for entry in entries)


def _beyond_repair(record: Record, entries: list[IndexEntry]) -> bool:
    """Whether a repair that reads the first chunk would leave the key as it is."""
    first = next((entry for entry in entries if entry.chunk == 0), None)
    return not _whole(entries) or first is None or not _label_differs(record, first)


def _label_differs(record: Record, entry: IndexEntry) -> bool:
    return (
        entry.version != record.version
        or entry.content_hash != record.content_hash
        or not same_metadata(entry.metadata, record.metadata)
    )


def _whole(entries: list[IndexEntry]) -> bool:
    """Whether a key's vectors are chunks 0 to n-1, all of one count n."""
    counts = {entry.chunks for entry in entries}
    return len(counts) == 1 and sorted(e.chunk for e in entries) == list(range(counts.pop()))


def _all_namespaces(store: MemoryStore, index: VectorIndex) -> list[str]:
    return sorted(set(store.namespaces()) | set(index.namespaces()))
