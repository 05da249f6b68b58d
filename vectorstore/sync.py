"""Memories: syncs and rollbacks across Redis (the truth) and Chroma (the index), a batch at a time.

A sync of one memory is a batch of one. A batch goes through five steps, each one round trip (or
one request per shard, or per embedding request) for the whole batch:

1. check   validate every item; a bad item fails alone and nothing is written for it.
2. look    read the current records of the embedded items (Redis); an item a newer message has
           overtaken is answered `stale` at once; for items whose text may be unchanged, read the
           hashes the index holds (Chroma `get`).
3. embed   one request for every text whose vectors the index lacks (split at the request limits);
           a text longer than the model's input limit is embedded as several chunks (`chunks.py`);
           a refusal about the input is narrowed down to the items that caused it.
4. write   one script call per item in one pipeline: versions, last-writer-wins and duplicates are
           decided there, item by item, and a write whose key's vector must change takes the key's
           index lock in the same call.
5. index   for every locked key, bring the index to the key's current record: one get (of the
           keys written before, for their chunk count and metadata names), one delete of chunks a
           shorter text no longer has, one upsert, one relabel and one delete per shard; then
           release the locks. Keys whose lock another writer held are waited for, read again and
           go through this step once they are ours.

Every step is idempotent, so a batch delivered again converges on the same state. Embedding
happens before any lock is taken, so a lock is held for one Chroma round trip, never an embedding
(except to repair a vector that vanished meanwhile), and expires quickly if its holder dies.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvstore import (
    InvalidValue,
    KeyRef,
    KVStoreError,
    LockLost,
    MemoryStore,
    Outcome,
    Record,
    Scalar,
    StoreUnavailable,
    Write,
    WriteMeta,
    WriteResult,
    canonical_json,
    check_key,
    check_metadata,
    check_namespace,
    content_hash,
    metadata_json,
    same_metadata,
)
from kvstore.validate import embedding_text
from vectorstore.embedder import Embedder
from vectorstore.errors import VectorStoreError
from vectorstore.index import IndexEntry, VectorIndex, vector_ids
from vectorstore.observer import NO_OBSERVER, Observer
from vectorstore.search import Hit, search
from vectorstore.vectors import KeyVectors, embed_texts, entries_for, relabelled

__all__ = ["LOCK_TIMEOUT_MS", "LOCK_WAIT_MS", "ItemResult", "Memories", "SyncItem"]

#: How long a key's index lock lives if its holder dies: the index step holds it for one Chroma
#: round trip per shard, never an embedding.
LOCK_TIMEOUT_MS = 8_000
#: How long a write waits for another writer's index lock on the same key before giving up (to retry).
LOCK_WAIT_MS = 10_000

#: What a batch gives back for each item: its write's result, or the error that failed it alone.
ItemResult = WriteResult | Exception
#: Called after the index step with the keys it brought in step, to do the same in other indexes.
Mirror = Callable[[list[KeyRef]], None]


@dataclass(frozen=True)
class SyncItem:
    """One memory to sync: the arguments of a single sync."""

    key: str
    value: Any
    namespace: str | None = None
    embed: bool = False
    ttl_ms: int | None = None
    meta: WriteMeta | None = None
    metadata: Mapping[str, Scalar] | None = None


@dataclass
class _Pending:
    """An item on its way through a batch: its write, and what the steps learned for it."""

    position: int
    write: Write
    text: str = ""  # the text still to embed; "" when nothing is (not embedded, or the index has it)
    vectors: KeyVectors | None = None  # the embedding of the item's text (a row per chunk), once made
    digest: str = ""  # the content hash `vectors` were made from, when not the write's own (a rollback)
    result: WriteResult | None = None

    @property
    def ref(self) -> KeyRef:
        return self.write.ref


@dataclass
class _Batch:
    """The results of a batch's items so far, by position; None while an item is still going."""

    results: list[ItemResult | None]
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def fail(self, items: Sequence[_Pending], error: Exception) -> None:
        for item in items:
            self.results[item.position] = error

    def going(self, items: Sequence[_Pending]) -> list[_Pending]:
        return [item for item in items if self.results[item.position] is None]


class Memories:
    """Keeps keys' values in Redis and their vectors in Chroma in step, a batch at a time."""

    def __init__(
        self,
        store: MemoryStore,
        index: VectorIndex,
        embedder: Embedder,
        *,
        search_retry_budget_ms: int = 2_000,
        observer: Observer = NO_OBSERVER,
        mirror: Mirror | None = None,
    ) -> None:
        self.store = store
        self.index = index
        self.embedder = embedder
        self.search_retry_budget_ms = search_retry_budget_ms
        self.observer = observer
        self.mirror = mirror  # brings another index to the same keys (a model migration)

    # Syncs and rollbacks.

    def sync(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        embed: bool = False,
        ttl_ms: int | None = None,
        meta: WriteMeta | None = None,
        metadata: Mapping[str, Scalar] | None = None,
    ) -> WriteResult:
        """Write `value` and `metadata` as the key's new version and bring its vectors in step."""
        [result] = self.sync_many([SyncItem(key, value, namespace, embed, ttl_ms, meta, metadata)])
        return _raised(result)

    def sync_many(self, items: Sequence[SyncItem], *, skip_unchanged: bool = False) -> list[ItemResult]:
        """Sync every item; one result per item, in order: its WriteResult, or the error that failed it.

        An item's error is its own: an invalid item, a refused text or a rollback target that is
        gone fails that item only. An unreachable Redis, Chroma or embedding server fails every
        item it concerns, each of which can be retried on its own. With `skip_unchanged`, an item
        whose key already holds the same value (and embed flag) makes no new version: `unchanged`.
        """
        batch = _Batch([None] * len(items))
        pending = [
            p for p in (self._check(batch, n, item, skip_unchanged) for n, item in enumerate(items)) if p
        ]
        pending = self._look(batch, pending)
        self._embed(batch, pending)
        self._write_and_index(batch, batch.going(pending))
        return [_done(result) for result in batch.results]

    def rollback(
        self,
        key: str,
        *,
        namespace: str | None = None,
        version: int | None = None,
        meta: WriteMeta | None = None,
    ) -> WriteResult:
        """Restore the previous (or a given retained) version as a new one, and re-index it."""
        ref = KeyRef(check_namespace(namespace), check_key(key))
        target = "" if version is None else str(version)
        batch = _Batch([None])
        write = Write(ref, "rollback", meta or WriteMeta(), target, lock_token=batch.token)
        item = _Pending(0, write)
        self._embed_target(item, version)
        self._write_and_index(batch, [item])
        return _raised(_done(batch.results[0]))

    def _embed_target(self, item: _Pending, version: int | None) -> None:
        """Embed the text a rollback will restore before its write, so that no lock waits for it.

        A failure to embed it fails the rollback before anything is written. The index step uses
        these vectors only if the record it restores has this text (the history may change meanwhile).
        """
        target = _restored(self.store.history(item.ref.key, namespace=item.ref.namespace), version)
        if target is None or not target.embed or target.deleted:
            return
        stored = self.index.stored([item.ref]).get(item.ref)
        if stored is not None and stored.content_hash == target.content_hash:
            return  # a relabel will do
        [vectors] = embed_texts(self.embedder, [_text_of(target)])
        if isinstance(vectors, Exception):
            raise vectors
        item.vectors, item.digest = vectors, target.content_hash

    def undo(self, key: str, msg_id: str, *, namespace: str | None = None) -> bool:
        """Take back the version `msg_id` wrote, when it is still current (a sync that failed for good)."""
        ns = check_namespace(namespace)
        undone = self.store.revert(key, msg_id, namespace=ns)
        if undone:
            self.refresh([KeyRef(ns, check_key(key))])
        return undone

    def refresh(self, refs: Sequence[KeyRef]) -> None:
        """Make the index hold exactly what the keys' current records need.

        Used by reconcile and undo: no lock is taken, and a text the index lacks is embedded.
        """
        refs = list(dict.fromkeys(refs))
        heads = dict(zip(refs, self.store.records_of(refs), strict=True))
        self._apply(heads, {})

    def search(
        self,
        query: str,
        k: int = 5,
        namespace: str | None = None,
        where: Mapping[str, Any] | None = None,
        *,
        min_score: float | None = None,
    ) -> list[Hit]:
        """The `k` current memories closest in meaning to `query`; see `vectorstore.search.search`."""
        budget = self.search_retry_budget_ms
        return search(
            query,
            k,
            namespace,
            where,
            min_score=min_score,
            store=self.store,
            index=self.index,
            embedder=self.embedder,
            retry_budget_ms=budget,
            observer=self.observer,
        )

    # Step 1: check.

    def _check(self, batch: _Batch, position: int, item: SyncItem, skip_unchanged: bool) -> _Pending | None:
        try:
            ref = KeyRef(check_namespace(item.namespace), check_key(item.key))
            value_json = canonical_json(item.value, self.store.max_value_bytes)
            text = embedding_text(item.value, value_json)
            if item.embed and not text.strip():
                raise InvalidValue("value is an empty string; there is nothing to embed")
            labels = metadata_json(check_metadata(item.metadata))
        except KVStoreError as error:
            batch.results[position] = error
            return None
        digest = content_hash(text) if item.embed else ""
        write = Write(
            ref, "set", item.meta or WriteMeta(), value_json, item.embed, digest, item.ttl_ms,
            lock_token=batch.token, skip_unchanged=skip_unchanged, metadata_json=labels,
        )  # fmt: skip
        return _Pending(position, write, text if item.embed else "")

    # Step 2: look.

    def _look(self, batch: _Batch, pending: list[_Pending]) -> list[_Pending]:
        """Answer the items a newer message already overtook; clear the text of those the index holds."""
        embedded = [item for item in pending if item.write.embed]
        try:
            currents = self.store.records_of([item.ref for item in embedded])
        except StoreUnavailable as error:
            batch.fail(embedded, error)
            return batch.going(pending)
        maybe_same: list[_Pending] = []
        for item, current in zip(embedded, currents, strict=True):
            if _overtaken(current, item.write.meta):
                batch.results[item.position] = WriteResult(Outcome.STALE, current)
            elif current is not None and current.embed and current.content_hash == item.write.content_hash:
                maybe_same.append(item)
        self._skip_indexed(batch, maybe_same)
        return batch.going(pending)

    def _skip_indexed(self, batch: _Batch, items: list[_Pending]) -> None:
        """Clear the text of items whose vector the index already holds, so they are not embedded."""
        if not items:
            return
        try:
            stored = self.index.stored([item.ref for item in items])
        except VectorStoreError:
            return  # embed them all: the index step will say whether Chroma is back
        skipped = 0
        for item in items:
            entry = stored.get(item.ref)
            if entry is not None and entry.content_hash == item.write.content_hash:
                item.text = ""
                skipped += 1
        if skipped:
            self.observer.embeddings_skipped(skipped)

    # Step 3: embed.

    def _embed(self, batch: _Batch, pending: list[_Pending]) -> None:
        wanted = [item for item in pending if item.text]
        for item, vectors in zip(wanted, embed_texts(self.embedder, [i.text for i in wanted]), strict=True):
            if isinstance(vectors, Exception):
                batch.results[item.position] = vectors
            else:
                item.vectors = vectors

    # Step 4: write; step 5: index.

    def _write_and_index(self, batch: _Batch, pending: list[_Pending]) -> None:
        try:
            results = self.store.write_many([item.write for item in pending], lock_ttl_ms=LOCK_TIMEOUT_MS)
        except StoreUnavailable as error:
            batch.fail(pending, error)
            return
        for item, result in zip(pending, results, strict=True):
            item.result = result if isinstance(result, WriteResult) else None
            batch.results[item.position] = result if isinstance(result, Exception) else None
        written = batch.going(pending)
        self._index_locked(batch, [i for i in written if _lock(i) == "held"], None)
        busy = [i for i in written if _lock(i) == "busy"]
        self._index_when_free(batch, busy)
        for item in batch.going(written):
            batch.results[item.position] = item.result

    def _index_when_free(self, batch: _Batch, items: list[_Pending]) -> None:
        """Wait for other writers' locks on these keys, then index each from its record read anew."""
        deadline, pause = time.monotonic() + LOCK_WAIT_MS / 1000, 0.01
        while items:
            try:
                taken = self.store.take_locks([item.ref for item in items], batch.token, LOCK_TIMEOUT_MS)
                mine = [item for item, ok in zip(items, taken, strict=True) if ok]
                heads = self.store.records_of([item.ref for item in mine]) if mine else []
            except StoreUnavailable as error:
                batch.fail(items, error)
                return
            self._index_locked(batch, mine, heads)
            items = [item for item, ok in zip(items, taken, strict=True) if not ok]
            if items and time.monotonic() > deadline:
                batch.fail(items, StoreUnavailable(f"a key stayed locked for {LOCK_WAIT_MS // 1000} s"))
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.2)

    def _index_locked(self, batch: _Batch, items: list[_Pending], heads: list[Record | None] | None) -> None:
        """Index keys whose lock this batch holds, from `heads` (or each write's result), then release."""
        if not items:
            return
        records = heads if heads is not None else [_current(item) for item in items]
        jobs: dict[KeyRef, Record | None] = {}
        vectors: dict[KeyRef, KeyVectors] = {}
        for item, head in zip(items, records, strict=True):
            if _owns(item, head):
                jobs[item.ref] = head
                if (
                    item.vectors is not None
                    and head is not None
                    and head.content_hash == (item.digest or item.write.content_hash)
                ):
                    vectors[item.ref] = item.vectors
        try:
            self._apply(jobs, vectors)
        except (VectorStoreError, StoreUnavailable) as error:
            batch.fail(items, error)
        finally:
            self._release(batch, items)

    def _release(self, batch: _Batch, items: list[_Pending]) -> None:
        try:
            released = self.store.release_locks([item.ref for item in items], batch.token)
        except StoreUnavailable as error:  # the locks expire on their own
            batch.fail(batch.going(items), error)
            return
        lost = [item for item, ok in zip(items, released, strict=True) if not ok]
        batch.fail(batch.going(lost), LockLost("a key's index lock expired during its index step"))

    def _apply(self, heads: dict[KeyRef, Record | None], vectors: Mapping[KeyRef, KeyVectors]) -> None:
        """Bring each key's vectors to its record: delete, relabel, or embed (unless given) and upsert.

        What the index holds for the keys is read first: chunks a shorter text no longer has are
        deleted before the upsert (so that a step cut short leaves no vector the first chunk's count
        does not account for), and metadata fields a version lost are cleared (Chroma merges them).
        """
        gone = [ref for ref, head in heads.items() if head is None or head.deleted or not head.embed]
        live = {ref: head for ref, head in heads.items() if head is not None and ref not in gone}
        unknown = [ref for ref in live if ref not in vectors]
        stored = self.index.stored(list(heads)) if heads else {}  # a version 1 may follow an expired key
        relabel, missing = _sorted_by_index(live, unknown, stored)
        made = {**vectors, **self._made(live, missing)}
        self.index.delete_ids(_removed(gone, stored))
        self.put_vectors(live, made, stored)
        self.index.relabel([e for ref in relabel for e in relabelled(live[ref], stored[ref])])
        if self.mirror is not None:  # still under the keys' locks, when the step holds them
            self.mirror(list(heads))

    def put_vectors(
        self,
        records: Mapping[KeyRef, Record],
        vectors: Mapping[KeyRef, KeyVectors],
        stored: Mapping[KeyRef, IndexEntry],
    ) -> None:
        """Write the keys' vectors, given what the index held for them; chunks past the new count go first."""
        self.index.delete_ids(_surplus(vectors, stored))
        refs = [ref for ref in records if ref in vectors]
        entries = [e for ref in refs for e in entries_for(records[ref], vectors[ref], stored.get(ref))]
        rows = [vectors[ref].rows for ref in refs]
        self.index.upsert(entries, np.concatenate(rows) if rows else np.zeros((0, 0), np.float32))

    def _made(self, live: Mapping[KeyRef, Record], missing: list[KeyRef]) -> dict[KeyRef, KeyVectors]:
        """The vectors of texts the index lacks; the first failure is raised (the step fails as a whole)."""
        made = embed_texts(self.embedder, [_text_of(live[ref]) for ref in missing])
        for vectors in made:
            if isinstance(vectors, Exception):
                raise vectors
        return dict(zip(missing, made, strict=True))  # type: ignore[arg-type]


def _sorted_by_index(
    live: dict[KeyRef, Record],
    unknown: list[KeyRef],
    stored: dict[KeyRef, IndexEntry],
) -> tuple[list[KeyRef], list[KeyRef]]:
    """Of the keys without a fresh vector: which need new labels, and which a new embedding.

    A key whose vector already has its record's hash, version and metadata needs neither.
    """
    relabel, missing = [], []
    for ref in unknown:
        entry, head = stored.get(ref), live[ref]
        if entry is None or entry.content_hash != head.content_hash:
            missing.append(ref)
        elif entry.version != head.version or not same_metadata(entry.metadata, head.metadata):
            relabel.append(ref)
    return relabel, missing


def _owns(item: _Pending, head: Record | None) -> bool:
    """Whether this item's index step is the one to bring the key's vectors to `head`.

    A head without a vector is anyone's to clean up (its own writer may have skipped the step when
    the version before it had none). An embedded head is this item's when the item wrote it, or
    when its text is the item's text; otherwise its own writer indexes it.
    """
    if head is None or head.deleted or not head.embed:
        return True
    if head.msg_id == item.write.meta.msg_id:
        return True
    return item.write.embed and head.content_hash == item.write.content_hash


def _overtaken(current: Record | None, meta: WriteMeta) -> bool:
    """Whether a newer message than `meta`'s already wrote the key (so this one changes nothing)."""
    if current is None or not meta.ordered or current.msg_id == meta.msg_id:
        return False
    return (meta.msg_ts, meta.msg_id) < (current.msg_ts, current.msg_id)


def _lock(item: _Pending) -> str:
    return item.result.lock if item.result is not None else ""


def _current(item: _Pending) -> Record | None:
    return item.result.current if item.result is not None else None


def _removed(gone: list[KeyRef], stored: Mapping[KeyRef, IndexEntry]) -> dict[KeyRef, list[str]]:
    """The ids of every chunk of keys that must have no vectors (by the count their first chunk gives)."""
    return {ref: vector_ids(ref, stored[ref].chunks) for ref in gone if ref in stored}


def _restored(history: list[Record], version: int | None) -> Record | None:
    """The record a rollback to `version` (None: the previous one) restores, when it is retained."""
    if version is None:
        return history[0] if history else None
    return next((record for record in history if record.version == version), None)


def _surplus(
    vectors: Mapping[KeyRef, KeyVectors], stored: Mapping[KeyRef, IndexEntry]
) -> dict[KeyRef, list[str]]:
    """The ids of chunks the index holds past the new chunk count of each key."""
    surplus: dict[KeyRef, list[str]] = {}
    for ref, new in vectors.items():
        old = stored.get(ref)
        if old is not None and old.chunks > len(new.chunks):
            surplus[ref] = vector_ids(ref, old.chunks, first=len(new.chunks))
    return surplus


def _text_of(record: Record) -> str:
    return embedding_text(record.value, record.value_json or "")


def _done(result: ItemResult | None) -> ItemResult:
    if result is None:  # every step sets a result or leaves the item going to the next
        raise RuntimeError("a batch item was left without a result")
    return result


def _raised(result: ItemResult) -> WriteResult:
    if isinstance(result, Exception):
        raise result
    return result
