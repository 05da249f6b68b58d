"""`memsync status`: queues, workers, memories, vectors and drift in one look, and a health check's exit code.

It reads Redis, the broker and Chroma, and never builds an embedder: no model is loaded and no
embedding is requested. Finding drift reads every embedded record and vector of the namespaces
looked at (a dry-run `reconcile`), which is what `--no-drift` skips on a large store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import dramatiq

from actors.indexes import own_spec
from actors.queues import QueueCounts, queue_counts
from actors.runtime import Runtime
from actors.transfer import workers_alive
from kvstore import Census
from vectorstore import VectorIndex
from vectorstore.active import IndexSpec, IndexState
from vectorstore.reconcile import Drift, drifts

__all__ = ["DRIFT_FOUND", "HEALTHY", "NO_WORKER", "Status", "read_status", "status_lines"]

#: Exit codes: healthy; no worker alive (whatever else); drift found while workers are alive.
HEALTHY, NO_WORKER, DRIFT_FOUND = 0, 3, 4
#: Namespaces listed one by one in the text output; `--json` lists them all.
_LISTED = 20


@dataclass(frozen=True)
class Status:
    """What `status` found; `drift` is None when it was not looked for."""

    workers_alive: int
    queues: list[QueueCounts]
    dead_letters: int
    index: IndexState
    namespaces: list[Census]
    collections: dict[str, int]
    drift: list[Drift] | None

    @property
    def drifted(self) -> list[Drift]:
        return [d for d in self.drift or [] if any(d.counts().values())]

    @property
    def problems(self) -> list[str]:
        found = [] if self.workers_alive else ["no worker is alive"]
        if drifted := len(self.drifted):
            where = _plural(drifted, "namespace")
            found.append(f"the index has drifted from Redis in {where} (memsync reconcile repairs it)")
        return found

    @property
    def exit_code(self) -> int:
        if not self.workers_alive:
            return NO_WORKER
        return DRIFT_FOUND if self.drifted else HEALTHY

    def as_dict(self) -> dict[str, Any]:
        """What `status --json` prints."""
        return {
            "healthy": not self.problems,
            "problems": self.problems,
            "workers_alive": self.workers_alive,
            "queues": [asdict(counts) for counts in self.queues],
            "dead_letters": self.dead_letters,
            "embedding": _spec(self.index.active),
            "reindex": _reindex_view(self.index),
            "memories": sum(c.memories for c in self.namespaces),
            "embedded": sum(c.embedded for c in self.namespaces),
            "namespaces": [asdict(census) for census in self.namespaces],
            "vectors": sum(self.collections.values()),
            "collections": [
                {"collection": name, "vectors": n} for name, n in sorted(self.collections.items())
            ],
            "drift": None if self.drift is None else [_drift_view(drift) for drift in self.drifted],
        }


def read_status(
    runtime: Runtime, broker: dramatiq.Broker, *, namespaces: Sequence[str] | None = None, drift: bool = True
) -> Status:
    """Look at everything, for the namespaces given (all by default)."""
    store, index_state = runtime.store, _index_state(runtime)
    index = _bare_index(runtime, index_state.active)
    names = list(namespaces) if namespaces else store.namespaces()
    return Status(
        workers_alive=workers_alive(runtime),
        queues=[queue_counts(broker, queue) for queue in sorted(broker.get_declared_queues())],
        dead_letters=int(runtime.redis.hlen(runtime.keys.dead_letters())),
        index=index_state,
        namespaces=[store.census(name) for name in names],
        collections=index.vector_counts(),
        drift=drifts(store, index, list(namespaces) if namespaces else None) if drift else None,
    )


def _index_state(runtime: Runtime) -> IndexState:
    """The recorded active index; before any process has recorded one, the settings' own."""
    return runtime.indexes.records.read() or IndexState(own_spec(runtime.settings))


def _bare_index(runtime: Runtime, spec: IndexSpec) -> VectorIndex:
    """The shard collections of `spec`, without the embedder `ActiveIndexes` would build with them."""
    indexes = runtime.indexes
    return VectorIndex(
        indexes.client,
        model=spec.model,
        dimensions=spec.dimensions,
        prefix=indexes.prefix,
        shards=indexes.shards,
    )


def _spec(spec: IndexSpec) -> dict[str, Any]:
    return {"model": spec.model, "dimensions": spec.dimensions}


def _reindex_view(index: IndexState) -> dict[str, Any] | None:
    migration = index.migration
    return None if migration is None else {"to": _spec(migration.target), "phase": migration.phase}


def _drift_view(drift: Drift) -> dict[str, Any]:
    return {"namespace": drift.namespace, **drift.counts()}


def status_lines(status: Status) -> list[str]:
    """The text output: one line per fact, and a last line saying healthy or what is wrong."""
    return [
        f"workers alive: {status.workers_alive}",
        *(_queue_line(counts) for counts in status.queues),
        f"dead letters: {status.dead_letters} (memsync dlq list)",
        f"embedding: {status.index.active}",
        *_reindex_lines(status.index),
        *_memory_lines(status.namespaces),
        *_vector_lines(status.collections),
        _drift_line(status),
        f"unhealthy: {'; '.join(status.problems)}" if status.problems else "healthy",
    ]


def _reindex_lines(index: IndexState) -> list[str]:
    migration = index.migration
    return [] if migration is None else [f"reindex: to {migration.target} ({migration.phase})"]


def _queue_line(counts: QueueCounts) -> str:
    in_flight = "" if counts.in_flight is None else f", {counts.in_flight} in flight"
    return (
        f"queue {counts.queue}: {counts.ready} ready, {counts.delayed} delayed{in_flight}, {counts.dead} dead"
    )


def _memory_lines(censuses: list[Census]) -> list[str]:
    total, embedded = sum(c.memories for c in censuses), sum(c.embedded for c in censuses)
    lines = [f"memories: {total} ({embedded} embedded) in {_plural(len(censuses), 'namespace')}"]
    lines += [f"  {c.namespace}: {c.memories} ({c.embedded} embedded)" for c in censuses[:_LISTED]]
    if len(censuses) > _LISTED:
        lines.append(f"  and {len(censuses) - _LISTED} more (--json lists them all)")
    return lines


def _vector_lines(collections: dict[str, int]) -> list[str]:
    lines = [f"vectors: {sum(collections.values())} in {_plural(len(collections), 'collection')}"]
    return lines + [f"  {name}: {count}" for name, count in sorted(collections.items())]


def _drift_line(status: Status) -> str:
    if status.drift is None:
        return "drift: not looked for (--no-drift)"
    rows = [f"{d.namespace} ({_counts_text(d)})" for d in status.drifted]
    return f"drift: {'; '.join(rows)}" if rows else "drift: none"


def _counts_text(drift: Drift) -> str:
    return ", ".join(f"{name} {count}" for name, count in drift.counts().items())


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
