"""Reconcile: find and repair drift between Redis (the truth) and the Chroma index."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore import KeyRef, MemoryStore, Record
from vectorstore.index import IndexEntry, VectorIndex
from vectorstore.sync import Memories

__all__ = ["REPAIR_BATCH", "Drift", "drifts", "find_drift", "index_drift", "reconcile"]

#: Keys repaired per batch: one Redis read, one Chroma get and one embedding request each.
REPAIR_BATCH = 500


@dataclass
class Drift:
    """What differs in one namespace: keys with no vector, an out-of-date one, or a vector with no key."""

    namespace: str
    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    orphan: list[str] = field(default_factory=list)

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
    indexed = {entry.key: entry for entry in index.entries(namespace)}
    drift = Drift(namespace)
    drift.missing = sorted(set(wanted) - set(indexed))
    drift.stale = sorted(key for key in set(wanted) & set(indexed) if _differs(wanted[key], indexed[key]))
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
    """Re-index missing and stale keys and drop orphans, in batches of `REPAIR_BATCH` keys."""
    refs = [KeyRef(drift.namespace, key) for key in [*drift.missing, *drift.stale, *drift.orphan]]
    for start in range(0, len(refs), REPAIR_BATCH):
        memories.refresh(refs[start : start + REPAIR_BATCH])


def _differs(record: Record, entry: IndexEntry) -> bool:
    return record.version != entry.version or record.content_hash != entry.content_hash


def _all_namespaces(store: MemoryStore, index: VectorIndex) -> list[str]:
    return sorted(set(store.namespaces()) | set(index.namespaces()))
