"""Reindex: embed every memory again with another model, while search keeps answering from the old one.

The steps, each recorded in Redis so that a run stopped at any point (even by SIGKILL) is finished
by running it again:

1. begin    record the migration (`{prefix}:index:reindex`: target and source), then wait until every
            process has read it (`settle_s`). From then on, every sync writes both indexes: the
            active (source) one as before, and the target, embedding with the target model.
2. copy     walk every namespace and its keys in sorted order, a batch at a time: read the current
            records, embed the texts the target lacks (one request, no lock held), upsert them, then
            take the keys' index locks and bring the target to each key's record as it is now (a
            key written meanwhile is embedded again there). After each batch, save the checkpoint
            (the last namespace and key) in the record: a resumed run starts after it.
3. switch   make the target active and the migration "switched" in one transaction; wait until
            every process has read it. Searches now read the target; syncs still write both, so
            a process that has not yet read the switch still searches a complete source.
4. finish   remove the migration record: syncs write the active index only.

The locks make the copy and the syncs' index steps take turns per key, and each brings the target
to the key's record as it is when it runs, so the last to run leaves the current one. A sync whose
index step saw no migration ran before `begin` + `settle_s`, and so before the copy read its key.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from kvstore import KeyRef, MemoryStore, Record
from kvstore.validate import embedding_text
from vectorstore.active import ActiveIndexes, IndexSpec, Migration, ReindexError, specs_in_chroma
from vectorstore.index import translated
from vectorstore.sync import LOCK_TIMEOUT_MS, LOCK_WAIT_MS, Memories
from vectorstore.vectors import KeyVectors, embed_texts

__all__ = ["DEFAULT_BATCH", "ReindexSummary", "abort", "drop_old", "reindex", "settle_s"]

#: Keys per batch: one Redis read, one Chroma get and at most one embedding request each.
DEFAULT_BATCH = 500

#: Told after each batch: the summary so far.
Progress = Callable[["ReindexSummary"], None]


@dataclass
class ReindexSummary:
    """What a run did: from and to which index, keys copied (in all runs) and texts embedded (in this one)."""

    source: str
    target: str
    total: int = 0
    done: int = 0
    resumed_at: int = 0
    embedded: int = 0
    batches: int = 0
    switched: bool = False
    dropped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "from": self.source,
            "to": self.target,
            "keys": self.done,
            "total": self.total,
            "resumed_at": self.resumed_at,
            "embedded": self.embedded,
            "batches": self.batches,
            "switched": self.switched,
            "dropped": self.dropped,
        }


def settle_s(check_ms: int) -> float:
    """How long to wait after changing the records until every process has read them again."""
    return check_ms * 1.1 / 1000 + 0.05


def reindex(
    indexes: ActiveIndexes,
    target: IndexSpec,
    *,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
    drop: bool = False,
) -> ReindexSummary:
    """Move search to `target`: embed every memory with it, switch, and stop writing the old index.

    Resumes a migration to the same target that was stopped; refuses one to another target.
    Changes nothing when `target` is already active and no migration is under way. With `drop`,
    then deletes the collections of every other index (`drop_old`).
    """
    summary = _migrate(indexes, target, batch_size, progress)
    if drop:
        if summary.switched:  # until no process writes the source any more
            time.sleep(settle_s(indexes.check_ms))
        summary.dropped = drop_old(indexes)
    return summary


def _migrate(
    indexes: ActiveIndexes, target: IndexSpec, batch_size: int, progress: Progress | None
) -> ReindexSummary:
    if batch_size < 1:
        raise ReindexError(f"the batch size must be at least 1, not {batch_size}")
    state = indexes.state(fresh=True)
    migration = state.migration
    if migration is None and state.active == target:
        return ReindexSummary(str(target), str(target))
    if migration is None:
        migration = indexes.records.begin(Migration(target, state.active))
        time.sleep(settle_s(indexes.check_ms))
    if migration.target != target:
        raise ReindexError(
            f"a migration to {migration.target} is under way; run reindex with that model and dimensions"
            " to finish it, or reindex --abort to give it up"
        )
    summary = ReindexSummary(str(migration.source), str(target), resumed_at=migration.done)
    if migration.phase == "copying":
        migration = _copy_all(indexes, migration, summary, batch_size, progress)
        migration = indexes.records.switch(migration)
    time.sleep(settle_s(indexes.check_ms))  # also on a resume: the switch may be that recent
    summary.done, summary.switched = migration.done, True
    indexes.records.finish()
    return summary


def abort(indexes: ActiveIndexes) -> Migration | None:
    """Give up the migration under way, before its switch; the one given up (None when there was none).

    Searches never left the source, which stays active; the target's collections stay, no longer
    kept in step, until `drop_old` (a later migration to the same model reuses what they hold).
    """
    migration = indexes.state(fresh=True).migration
    if migration is not None and migration.phase != "copying":
        raise ReindexError(
            f"the migration to {migration.target} has switched already: run reindex to finish it"
        )
    if migration is not None:
        indexes.records.finish()
    return migration


def drop_old(indexes: ActiveIndexes) -> list[str]:
    """Delete the shard collections of every index but the active one; their names.

    Refused while a migration is under way: its source is still searched or written.
    """
    state = indexes.state(fresh=True)
    if state.migration is not None:
        raise ReindexError("a migration is under way: run reindex to finish it before dropping old indexes")
    dropped: list[str] = []
    for spec, names in specs_in_chroma(indexes.client, indexes.prefix, indexes.shards).items():
        if spec != state.active:
            with translated():
                for name in names:
                    indexes.client.delete_collection(name)
            dropped.extend(names)
    return sorted(dropped)


def _copy_all(
    indexes: ActiveIndexes,
    migration: Migration,
    summary: ReindexSummary,
    batch_size: int,
    progress: Progress | None,
) -> Migration:
    """Copy every key after the checkpoint into the target, saving the checkpoint after each batch."""
    store = indexes.store
    target = indexes.memories_for(migration.target, mirrored=False)
    namespaces = store.namespaces()
    summary.total = sum(store.count_keys(ns) for ns in namespaces)
    summary.done = migration.done
    for namespace, keys in _pages(store, namespaces, migration, batch_size):
        summary.embedded += _copy(target, [KeyRef(namespace, key) for key in keys])
        migration = replace(migration, namespace=namespace, after=keys[-1], done=migration.done + len(keys))
        summary.done, summary.batches = migration.done, summary.batches + 1
        if not indexes.records.checkpoint(migration):  # switched by another run, or given up
            if indexes.state(fresh=True).active != migration.target:
                raise ReindexError("the migration was given up meanwhile (reindex --abort)")
            break  # another run copied everything and switched
        if progress is not None:
            progress(summary)
    return migration


def _pages(
    store: MemoryStore, namespaces: list[str], migration: Migration, batch_size: int
) -> Iterator[tuple[str, list[str]]]:
    """The keys after the checkpoint, a batch at a time, namespace by namespace in sorted order."""
    for namespace in sorted(namespaces):
        if namespace < migration.namespace:
            continue
        after = migration.after if namespace == migration.namespace else ""
        while keys := store.keys_after(namespace, after, batch_size):
            yield namespace, keys
            after = keys[-1]


def _copy(target: Memories, refs: list[KeyRef]) -> int:
    """Bring the target index to the keys' current records; how many texts were embedded.

    The embedding happens before any lock is taken; under the locks, `refresh` only relabels,
    deletes, or embeds a text that changed in between.
    """
    live = [r for r in target.store.records_of(refs) if r is not None and r.embed and not r.deleted]
    stored = target.index.stored([record.ref for record in live])
    wanted = [r for r in live if (e := stored.get(r.ref)) is None or e.content_hash != r.content_hash]
    if wanted:
        made = embed_texts(target.embedder, [_text(record) for record in wanted])
        vectors = {r.ref: v for r, v in zip(wanted, made, strict=True) if isinstance(v, KeyVectors)}
        target.put_vectors({r.ref: r for r in wanted}, vectors, stored)
        if failed := [v for v in made if not isinstance(v, KeyVectors)]:
            raise failed[0]
    _under_locks(target.store, refs, target.refresh)
    return len(wanted)


def _under_locks(store: MemoryStore, refs: Sequence[KeyRef], action: Callable[[list[KeyRef]], None]) -> None:
    """Run `action` on the keys whose index locks this call holds, until every key has had its turn.

    A key another writer holds is tried again after a pause (no lock is held while waiting); one whose
    lock expired during `action` gets another turn.
    """
    token, pending = uuid.uuid4().hex, list(refs)
    deadline, pause = time.monotonic() + LOCK_WAIT_MS / 1000, 0.01
    while pending:
        taken = store.take_locks(pending, token, LOCK_TIMEOUT_MS)
        mine = [ref for ref, ok in zip(pending, taken, strict=True) if ok]
        try:
            if mine:
                action(mine)
        finally:
            released = store.release_locks(mine, token) if mine else []
        lost = [ref for ref, ok in zip(mine, released, strict=True) if not ok]
        pending = [ref for ref, ok in zip(pending, taken, strict=True) if not ok] + lost
        if pending and time.monotonic() > deadline:
            raise ReindexError(
                f"{len(pending)} keys stayed locked for {LOCK_WAIT_MS // 1000} s; run reindex again"
            )
        if pending:
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


def _text(record: Record) -> str:
    return embedding_text(record.value, record.value_json or "")
