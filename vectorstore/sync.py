"""Memories: a sync or rollback across Redis (the truth) and Chroma (the index), in that order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvstore import (
    InvalidValue,
    MemoryStore,
    Outcome,
    Record,
    WriteMeta,
    WriteResult,
    canonical_json,
    check_key,
    check_namespace,
    content_hash,
)
from kvstore.validate import embedding_text
from vectorstore.embedder import Embedder
from vectorstore.index import IndexEntry, VectorIndex
from vectorstore.search import Hit, search

__all__ = ["LOCK_TIMEOUT_MS", "Memories"]

#: How long a key's index lock lives if its holder dies: the index step holds it for a Redis read
#: and one or two index calls, never an embedding.
LOCK_TIMEOUT_MS = 8_000


class Memories:
    """Keeps a key's value in Redis and its vector in Chroma in step.

    A sync embeds first (outside any lock; skipped when the key's vector already has the text's
    hash), then writes Redis atomically, then updates the index under a short per-key lock, only
    if the message still owns the key's current version. Each step is idempotent.
    """

    def __init__(self, store: MemoryStore, index: VectorIndex, embedder: Embedder) -> None:
        self.store = store
        self.index = index
        self.embedder = embedder

    def sync(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        embed: bool = False,
        ttl_ms: int | None = None,
        meta: WriteMeta | None = None,
    ) -> WriteResult:
        """Write `value` as the key's new version and bring its vector in step."""
        ns, key, meta = check_namespace(namespace), check_key(key), meta or WriteMeta()
        value_json = canonical_json(value, self.store.max_value_bytes)
        text = embedding_text(value, value_json)
        if embed and not text.strip():
            raise InvalidValue("value is an empty string; there is nothing to embed")
        digest = content_hash(text) if embed else ""
        current = self.store.record(key, namespace=ns)
        if _newer_than(current, meta):
            return WriteResult(Outcome.STALE, current)
        vector = self._vector(ns, key, text, digest, current) if embed else None
        result = self.store.set(
            key, value, namespace=ns, embed=embed, content_hash=digest, ttl_ms=ttl_ms, meta=meta
        )
        self._follow(result, meta.msg_id, vector, looked=embed)
        return result

    def rollback(
        self,
        key: str,
        *,
        namespace: str | None = None,
        version: int | None = None,
        meta: WriteMeta | None = None,
    ) -> WriteResult:
        """Restore the previous (or a given retained) version as a new one, and re-index it."""
        meta = meta or WriteMeta()
        result = self.store.rollback(key, namespace=namespace, version=version, meta=meta)
        self._follow(result, meta.msg_id, None, looked=False)
        return result

    def undo(self, key: str, msg_id: str, *, namespace: str | None = None) -> bool:
        """Take back the version `msg_id` wrote, when it is still current (a sync that failed for good)."""
        ns = check_namespace(namespace)
        undone = self.store.revert(key, msg_id, namespace=ns)
        if undone:
            self.refresh(self.store.record(key, namespace=ns), ns, key)
        return undone

    def refresh(
        self,
        record: Record | None,
        namespace: str,
        key: str,
        vector: Sequence[float] | None = None,
        *,
        indexed: bool = False,
    ) -> str:
        """Make the index hold exactly what `record` needs; returns what it did.

        `vector`, when given, is the embedding of exactly the record's text; `indexed` says the
        caller found the key's vector already made from that text, so only its version changes.
        """
        if record is None or record.deleted or not record.embed:
            self.index.delete(namespace, [key])
            return "deleted"
        entry = IndexEntry(key, record.version, record.content_hash)
        if vector is not None:
            self.index.upsert(namespace, [entry], [vector])
            return "embedded"
        if indexed:
            self.index.relabel(namespace, [entry])
            return "relabelled"
        stored = self.index.stored(namespace, [key]).get(key)
        if stored is not None and stored.content_hash == record.content_hash:
            if stored.version != record.version:
                self.index.relabel(namespace, [entry])
                return "relabelled"
            return "unchanged"
        vector = self.embedder.embed([_text_of(record)])[0]
        self.index.upsert(namespace, [entry], [vector])
        return "embedded"

    def search(
        self, query: str, k: int = 5, namespace: str | None = None, where: dict[str, Any] | None = None
    ) -> list[Hit]:
        """The `k` current memories closest in meaning to `query`; see `vectorstore.search.search`."""
        return search(query, k, namespace, where, store=self.store, index=self.index, embedder=self.embedder)

    def _vector(
        self, namespace: str, key: str, text: str, digest: str, current: Record | None
    ) -> list[float] | None:
        """The text's embedding, or None when the key's vector already has the text's hash."""
        if current is not None and current.embed and current.content_hash == digest:
            stored = self.index.stored(namespace, [key]).get(key)
            if stored is not None and stored.content_hash == digest:
                return None
        return self.embedder.embed([text])[0]

    def _follow(
        self, result: WriteResult, msg_id: str, vector: Sequence[float] | None, *, looked: bool
    ) -> None:
        """Update the index for the key if this message still owns its current version.

        `looked`: the caller already looked in the index, and `vector` is None only because the
        index holds this text's vector. Any embedding happens before the lock, so the lock is held
        for a Redis read and one index call; that keeps its expiry short for a worker that dies
        holding it. If a newer version without a vector owns the key, no vector is left behind.
        """
        record = result.current
        if record is None or record.msg_id != msg_id:
            return
        if not record.embed and not result.had_vector:
            return  # no vector before, none now
        if record.embed and not looked:
            vector = self._vector(record.namespace, record.key, _text_of(record), record.content_hash, record)
        with self.store.key_lock(record.key, namespace=record.namespace, timeout_ms=LOCK_TIMEOUT_MS):
            head = self.store.record(record.key, namespace=record.namespace)
            if head is not None and head.msg_id == msg_id:
                same = head.version == record.version
                indexed = same and record.embed and vector is None
                self.refresh(head, record.namespace, record.key, vector if same else None, indexed=indexed)
            elif head is None or head.deleted or not head.embed:
                # A newer version without a vector took over. Its writer skipped this step, as the
                # version before it (this one) had none; an older vector may still be in the index.
                self.index.delete(record.namespace, [record.key])


def _text_of(record: Record) -> str:
    return embedding_text(record.value, record.value_json or "")


def _newer_than(current: Record | None, meta: WriteMeta) -> bool:
    """Whether a newer message than `meta`'s already wrote the key (so this one changes nothing)."""
    if current is None or not meta.ordered or current.msg_id == meta.msg_id:
        return False
    return (meta.msg_ts, meta.msg_id) < (current.msg_ts, current.msg_id)
