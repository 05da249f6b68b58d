"""The end state every reliability scenario must reach, checked against Redis and Chroma.

A scenario records what it sent in an `Expectation` (per key: the value and version it must end
with; the message ids that must be dead-lettered), then calls `check_invariants`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from actors.deadletter import DeadLetters
from kvstore import MemoryStore
from vectorstore import IndexEntry, Memories
from vectorstore.reconcile import find_drift

__all__ = ["Expectation", "KeyState", "check_invariants"]

_DELETED = object()


@dataclass(frozen=True)
class KeyState:
    """What one key must hold at the end: its value (None with `deleted`), version, embedding and metadata."""

    value: Any
    version: int
    embed: bool = True
    deleted: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Expectation:
    """The end state a scenario must reach in one namespace."""

    namespace: str
    keys: dict[str, KeyState] = field(default_factory=dict)
    dead_message_ids: set[str] = field(default_factory=set)

    def sync(
        self, key: str, value: Any, *, embed: bool = True, metadata: dict[str, Any] | None = None
    ) -> None:
        """Record that a sync of `key` will be applied after every earlier one."""
        version = self.keys[key].version + 1 if key in self.keys else 1
        self.keys[key] = KeyState(value, version, embed, metadata=metadata or {})

    def restore(self, key: str, previous: KeyState) -> None:
        """Record that a rollback of `key` will restore `previous` as a new version."""
        version = self.keys[key].version + 1
        self.keys[key] = KeyState(
            previous.value, version, previous.embed, previous.deleted, previous.metadata
        )

    def delete(self, key: str) -> None:
        """Record that a rollback of a first version will delete `key`."""
        self.keys[key] = KeyState(None, self.keys[key].version + 1, False, True)


def check_invariants(memories: Memories, dead_letters: DeadLetters, expected: Expectation) -> dict[str, int]:
    """Fail with a precise message on any broken invariant; return the counts checked.

    - Redis holds exactly the expected keys, values and versions (a message applied twice, or lost,
      shows as a wrong version);
    - every key's history is the unbroken run of versions below its current one, as far as kept;
    - Chroma holds the vectors of every embedded current value (one per chunk of its text, as many as
      the embedder's chunker makes of it), at its current version and with its metadata: none
      missing, stale, left over or orphaned;
    - the dead-letter queue holds exactly the expected messages of this namespace, each with a reason.
    """
    ns = expected.namespace
    _check_redis(memories.store, expected)
    drift = find_drift(memories, ns)
    assert drift.counts() == {"missing": 0, "stale": 0, "orphan": 0}, f"index drift in {ns}: {drift}"
    vectors = _check_vectors(memories, expected)
    dead = _dead_of(dead_letters, ns)
    assert set(dead) == expected.dead_message_ids, (
        f"dead letters {sorted(dead)} != {sorted(expected.dead_message_ids)}"
    )
    assert all(reason for reason in dead.values()), f"a dead letter without a reason: {dead}"
    return {
        "keys": len(expected.keys),
        "dead_letters": len(dead),
        "vectors": vectors,
        "chunked": sum(1 for count in _chunk_counts(memories, expected).values() if count > 1),
    }


def _check_vectors(memories: Memories, expected: Expectation) -> int:
    """Every embedded key has exactly its chunks, each labelled with the key's version and metadata."""
    found: dict[str, list[IndexEntry]] = defaultdict(list)
    for entry in memories.index.entries(expected.namespace):
        found[entry.key].append(entry)
    for key, count in _chunk_counts(memories, expected).items():
        entries = sorted(found.get(key, []), key=lambda e: e.chunk)
        state = expected.keys[key]
        assert [e.chunk for e in entries] == list(range(count)), f"{key!r}: chunks {entries} != {count}"
        labels = {(e.version, e.chunks, json.dumps(dict(e.metadata), sort_keys=True)) for e in entries}
        want = (state.version, count, json.dumps(state.metadata, sort_keys=True))
        assert labels == {want}, f"{key!r}: vectors labelled {labels}, expected {want}"
    return sum(len(entries) for entries in found.values())


def _chunk_counts(memories: Memories, expected: Expectation) -> dict[str, int]:
    """How many vectors each embedded current key must have: the chunks its text splits into."""
    return {
        key: len(memories.embedder.chunker.split(_text(state.value)))
        for key, state in expected.keys.items()
        if state.embed and not state.deleted
    }


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


def _check_redis(store: MemoryStore, expected: Expectation) -> None:
    ns = expected.namespace
    live = {key for key, state in expected.keys.items() if not state.deleted}
    assert set(store.keys(namespace=ns)) == live, f"keys {sorted(store.keys(namespace=ns))} != {sorted(live)}"
    for key, state in expected.keys.items():
        record = store.record(key, namespace=ns)
        assert record is not None, f"{key!r} was never written"
        got = (_DELETED if record.deleted else record.value, record.version, record.embed, record.metadata)
        want = (
            _DELETED if state.deleted else state.value,
            state.version,
            state.embed and not state.deleted,
            {} if state.deleted else state.metadata,
        )
        assert got == want, f"{key!r}: (value, version, embed, metadata) {_show(got)} != {_show(want)}"
        _check_history(store, key, ns, record.version)


def _check_history(store: MemoryStore, key: str, namespace: str, version: int) -> None:
    versions = [record.version for record in store.history(key, namespace=namespace)]
    unbroken = list(range(version - 1, version - 1 - len(versions), -1))
    assert versions == unbroken, f"{key!r}: history versions {versions} below v{version}"


def _dead_of(dead_letters: DeadLetters, namespace: str) -> dict[str, str]:
    return {
        letter.message_id: letter.reason for letter in dead_letters.all() if letter.namespace == namespace
    }


def _show(values: Iterable[Any]) -> str:
    return json.dumps([("<deleted>" if value is _DELETED else value) for value in values], default=str)[:300]
