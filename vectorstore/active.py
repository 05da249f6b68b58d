"""The active index: which embedding model and dimensions `search()` uses, named by a record in Redis.

Each embedding model and dimensions has its own shard collections (an `IndexSpec`). The record
`{prefix}:index:active` names the one searches read and syncs write; every process reads it again
at most every `check_ms`, so when `memsync reindex` switches models, every process follows without a
restart, whatever its own EMBEDDING_MODEL says. While a migration is under way, the record
`{prefix}:index:reindex` names its target and source, and every sync writes both indexes (see
`vectorstore.reindex`). The first process to find no record writes one: the model whose collections
Chroma already holds, else its own.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any, Literal

import redis
from chromadb.api import ClientAPI

from kvstore import KeyRef, Keys, MemoryStore, redis_translated
from vectorstore.embedder import Embedder
from vectorstore.errors import VectorStoreError
from vectorstore.index import DEFAULT_SHARDS, VectorIndex, shard_name, translated
from vectorstore.observer import NO_OBSERVER, Observer
from vectorstore.sync import Memories

__all__ = [
    "ActiveIndexes",
    "IndexRecords",
    "IndexSpec",
    "IndexState",
    "Migration",
    "ReindexError",
    "specs_in_chroma",
]

Phase = Literal["copying", "switched"]


class ReindexError(VectorStoreError):
    """Raised when a model migration cannot start or go on, or a process cannot embed for the active index."""


@dataclass(frozen=True)
class IndexSpec:
    """An embedding model and its dimensions (None: the model's own); each has its own collections."""

    model: str
    dimensions: int | None

    def __str__(self) -> str:
        return f"{self.model} ({self.dimensions or 'native'} dimensions)"

    @classmethod
    def from_json(cls, data: Any) -> IndexSpec:
        return cls(str(data["model"]), int(data.get("dimensions") or 0) or None)


@dataclass(frozen=True)
class Migration:
    """A model migration under way: where it goes, where it comes from, and how far its copy got.

    `phase`: "copying" while the source is active; "switched" once the target is, until every
    process has seen it. The checkpoint is the last key copied (`namespace`, `after`) and how many
    keys were copied (`done`); namespaces and keys are walked in sorted order.
    """

    target: IndexSpec
    source: IndexSpec
    phase: Phase = "copying"
    namespace: str = ""
    after: str = ""
    done: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Migration:
        data = json.loads(text)
        return cls(
            IndexSpec.from_json(data["target"]),
            IndexSpec.from_json(data["source"]),
            data["phase"],
            data.get("namespace", ""),
            data.get("after", ""),
            int(data.get("done", 0)),
        )


@dataclass(frozen=True)
class IndexState:
    """What the records say: the active index, and the migration under way, if any."""

    active: IndexSpec
    migration: Migration | None = None

    def written(self) -> list[IndexSpec]:
        """Every index a sync must keep in step: the active one, and during a migration the other one."""
        m = self.migration
        return list(dict.fromkeys([self.active, *((m.target, m.source) if m else ())]))


class IndexRecords:
    """Reads and writes the active-index and migration records in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def read(self) -> IndexState | None:
        """The state in one round trip; None when no active index has been recorded yet."""
        with redis_translated():
            active, migration = self.client.mget([self.keys.active_index(), self.keys.reindex()])
        if active is None:
            return None
        try:
            return IndexState(
                IndexSpec.from_json(json.loads(active)), Migration.from_json(migration) if migration else None
            )
        except (ValueError, KeyError, TypeError):
            names = f"{self.keys.active_index()} or {self.keys.reindex()}"
            raise ReindexError(
                f"{names} holds no valid record; delete it, then run memsync reindex"
            ) from None

    def claim(self, spec: IndexSpec) -> IndexState:
        """Record `spec` as the active index unless one is recorded already; the state either way."""
        with redis_translated():
            self.client.set(self.keys.active_index(), _spec_json(spec), nx=True)
        state = self.read()
        if state is None:  # deleted between the two calls: claim again
            return self.claim(spec)
        return state

    def begin(self, migration: Migration) -> Migration:
        """Record a migration unless one is under way; the one under way."""
        with redis_translated():
            self.client.set(self.keys.reindex(), migration.to_json(), nx=True)
            current = self.client.get(self.keys.reindex())
        return Migration.from_json(current) if current else self.begin(migration)

    def checkpoint(self, migration: Migration) -> bool:
        """Save how far the copy got; False when it is no longer copying (another run switched it)."""
        key, saved = self.keys.reindex(), [False]

        def save(pipe: redis.client.Pipeline) -> None:  # run again if the record changes meanwhile
            current = pipe.get(key)
            saved[0] = current is not None and Migration.from_json(current).phase == "copying"
            if saved[0]:
                pipe.multi()
                pipe.set(key, migration.to_json())

        with redis_translated():
            self.client.transaction(save, key)
        return saved[0]

    def switch(self, migration: Migration) -> Migration:
        """Make the target active and mark the migration switched, both at once."""
        switched = replace(migration, phase="switched")
        with redis_translated():
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.keys.active_index(), _spec_json(migration.target))
            pipe.set(self.keys.reindex(), switched.to_json())
            pipe.execute()
        return switched

    def finish(self) -> None:
        """Remove the migration's record: from now on, syncs write the active index only."""
        with redis_translated():
            self.client.delete(self.keys.reindex())


def _spec_json(spec: IndexSpec) -> str:
    return json.dumps({"model": spec.model, "dimensions": spec.dimensions or 0})


def specs_in_chroma(client: ClientAPI, prefix: str, shards: int) -> dict[IndexSpec, list[str]]:
    """The indexes whose shard collections Chroma holds under `prefix` and `shards`, with their names."""
    with translated():
        collections = client.list_collections()
    found: dict[IndexSpec, list[str]] = {}
    for collection in collections:
        meta = collection.metadata or {}
        model, dims, shard = meta.get("model"), meta.get("dimensions"), meta.get("shard")
        if not isinstance(model, str) or not isinstance(shard, int) or meta.get("shards") != shards:
            continue
        spec = IndexSpec(model, int(dims) or None if isinstance(dims, int) else None)
        if collection.name == shard_name(prefix, spec.model, spec.dimensions, shard, shards):
            found.setdefault(spec, []).append(collection.name)
    return found


class ActiveIndexes:
    """A process's view of the active index: the `Memories` to sync and search with, for any model.

    `make_embedder` gives the embedder of a spec (the active one may not be this process's own
    model). The records are read again once `check_ms` has passed since the last read; the time
    is taken before the read, so a view never outlives the records it saw by more than `check_ms`.
    """

    def __init__(
        self,
        store: MemoryStore,
        client: ClientAPI,
        make_embedder: Callable[[IndexSpec], Embedder],
        *,
        default: IndexSpec,
        prefix: str = "memsync",
        shards: int = DEFAULT_SHARDS,
        check_ms: int = 1_000,
        search_retry_budget_ms: int = 2_000,
        observer: Observer = NO_OBSERVER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.client = client
        self.make_embedder = make_embedder
        self.default = default
        self.prefix = prefix
        self.shards = shards
        self.check_ms = check_ms
        self.search_retry_budget_ms = search_retry_budget_ms
        self.observer = observer
        self.records = IndexRecords(store.client, store.keys_of)
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: tuple[float, IndexState] | None = None
        self._built: dict[tuple[IndexSpec, bool], Memories] = {}

    def state(self, *, fresh: bool = False) -> IndexState:
        """The records as last read (read again when `check_ms` has passed, or when `fresh`)."""
        with self._lock:
            seen = self._seen
        if seen is not None and not fresh and (self._clock() - seen[0]) * 1000 < self.check_ms:
            return seen[1]
        read_at = self._clock()
        state = self.records.read() or self.records.claim(self._first_spec())
        with self._lock:
            self._seen = (read_at, state)
        return state

    def memories(self) -> Memories:
        """The `Memories` of the active index; its syncs also keep a migration's other index in step."""
        return self.memories_for(self.state().active)

    def memories_for(self, spec: IndexSpec, *, mirrored: bool = True) -> Memories:
        """The `Memories` of one index (built once); with `mirrored`, its syncs write the others too."""
        with self._lock:
            built = self._built.get((spec, mirrored))
        if built is not None:
            return built
        made = self._build(spec, mirrored)
        with self._lock:
            return self._built.setdefault((spec, mirrored), made)

    def index_for(self, spec: IndexSpec) -> VectorIndex:
        """The shard collections of one index."""
        return self.memories_for(spec, mirrored=False).index

    def _build(self, spec: IndexSpec, mirrored: bool) -> Memories:
        if mirrored:  # shares the unmirrored one's index and embedder: one writer queue per index
            plain = self.memories_for(spec, mirrored=False)
            index, embedder = plain.index, plain.embedder
        else:
            index = VectorIndex(
                self.client,
                model=spec.model,
                dimensions=spec.dimensions,
                prefix=self.prefix,
                shards=self.shards,
            )
            embedder = self.make_embedder(spec)
        return Memories(
            self.store,
            index,
            embedder,
            search_retry_budget_ms=self.search_retry_budget_ms,
            observer=self.observer,
            mirror=partial(self._mirror, spec) if mirrored else None,
        )

    def _mirror(self, written: IndexSpec, refs: Sequence[KeyRef]) -> None:
        """Bring every other index the records name to the keys' current records (a migration)."""
        if not refs:
            return
        for spec in self.state().written():
            if spec != written:
                self.memories_for(spec, mirrored=False).refresh(list(refs))

    def _first_spec(self) -> IndexSpec:
        """The index to record when none is: the only one Chroma holds, else this process's own."""
        found = specs_in_chroma(self.client, self.prefix, self.shards)
        if self.default not in found and len(found) == 1:
            return next(iter(found))
        return self.default
