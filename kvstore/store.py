"""MemoryStore: current values, versions, bounded history and rollback, over Redis."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import redis

from kvstore.errors import (
    KeyNotFound,
    KVStoreError,
    LockLost,
    NothingToRollBack,
    StoreUnavailable,
    StoreUnreachable,
    VersionNotFound,
)
from kvstore.keys import Keys
from kvstore.models import Census, KeyRef, Outcome, Record, Write, WriteMeta, WriteResult, now_ms
from kvstore.scripts import Script, run_pipelined
from kvstore.validate import Scalar, canonical_json, check_key, check_metadata, check_namespace, metadata_json

__all__ = ["MemoryStore", "WriteMeta", "redis_translated"]

Clock = Callable[[], int]


@contextmanager
def redis_translated() -> Iterator[None]:
    """Turn redis-py's failures into StoreUnavailable, never with the URL (it may hold a password)."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as err:
        raise StoreUnreachable(f"Redis is unreachable: {type(err).__name__}") from err
    except redis.ResponseError as err:
        raise StoreUnavailable(f"Redis refused a command: {str(err)[:200]}") from err


class MemoryStore:
    """Versioned JSON values in Redis; every write, delete and rollback makes a new version.

    `history_length` earlier versions are kept per key for rollback. Values larger than
    `max_value_bytes` as canonical JSON are refused.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "memsync",
        history_length: int = 10,
        max_value_bytes: int = 1_048_576,
        clock: Clock = now_ms,
    ) -> None:
        self.client = client
        self.keys_of = Keys(prefix)
        self.history_length = history_length
        self.max_value_bytes = max_value_bytes
        self._clock = clock
        self._write = Script("write.lua")
        self._revert = Script("revert.lua")
        self._release = Script("release.lua")

    # The seed's interface: get, set, delete, has, keys.

    def get(self, key: str, *, namespace: str | None = None) -> Any:
        """The key's current value, or None when it has none."""
        record = self.record(key, namespace=namespace)
        return None if record is None else record.value

    def set(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        embed: bool = False,
        content_hash: str = "",
        ttl_ms: int | None = None,
        meta: WriteMeta | None = None,
        metadata: Mapping[str, Scalar] | None = None,
    ) -> WriteResult:
        """Write a new version of `key` holding `value` (any JSON) and `metadata` (see `check_metadata`)."""
        value_json = canonical_json(value, self.max_value_bytes)
        labels = metadata_json(check_metadata(metadata))
        ref, meta = _ref(namespace, key), meta or WriteMeta()
        write = Write(
            ref, "set", meta, value_json, embed=embed, content_hash=content_hash, ttl_ms=ttl_ms,
            metadata_json=labels,
        )  # fmt: skip
        return self._one(write)

    def delete(self, key: str, *, namespace: str | None = None, meta: WriteMeta | None = None) -> WriteResult:
        """Record a deletion as a new version (a rollback restores the value)."""
        return self._one(Write(_ref(namespace, key), "delete", meta or WriteMeta()))

    def has(self, key: str, *, namespace: str | None = None) -> bool:
        record = self.record(key, namespace=namespace)
        return record is not None and not record.deleted

    def keys(self, *, namespace: str | None = None) -> list[str]:
        """The keys of a namespace that hold a value, sorted; expired keys are left out."""
        ns = check_namespace(namespace)
        with redis_translated():
            names = [_text(k) for k in self.client.zrange(self.keys_of.key_index(ns), 0, -1)]
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.exists(self.keys_of.head(ns, name))
            alive = pipe.execute()
        return [name for name, exists in zip(names, alive, strict=True) if exists]

    def keys_after(self, namespace: str, after: str, count: int) -> list[str]:
        """Up to `count` keys of a namespace that sort after `after` ("" for the first), in key order.

        One page of a walk that can stop and go on from its last key; expired keys may be listed.
        """
        ns = check_namespace(namespace)
        low = f"({after}" if after else "-"
        with redis_translated():
            names = self.client.zrangebylex(self.keys_of.key_index(ns), low, "+", start=0, num=count)
        return [_text(name) for name in names]

    def count_keys(self, namespace: str) -> int:
        """How many keys of a namespace hold a value (expired ones included until a write notices)."""
        with redis_translated():
            return int(self.client.zcard(self.keys_of.key_index(check_namespace(namespace))))

    def census(self, namespace: str, *, page: int = 1000) -> Census:
        """How many keys of a namespace hold a value, and how many of those are embedded.

        One round trip per `page` keys for the list, one for their embed flags; values are not read.
        """
        ns, after = check_namespace(namespace), ""
        census = Census(ns, 0, 0)
        while names := self.keys_after(ns, after, page):
            with redis_translated():
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    pipe.hget(self.keys_of.head(ns, name), "embed")
                flags = pipe.execute()
            census = census.add([flag for flag in flags if flag is not None])
            after = names[-1]
        return census

    # Versions, history and rollback.

    def record(self, key: str, *, namespace: str | None = None) -> Record | None:
        """The key's current record (a deleted key has one, with no value), or None if never written."""
        ns, key = check_namespace(namespace), check_key(key)
        with redis_translated():
            fields = self.client.hgetall(self.keys_of.head(ns, key))
        return Record.from_fields(ns, key, _decoded(fields)) if fields else None

    def records(self, keys: list[str], *, namespace: str | None = None) -> dict[str, Record]:
        """The current records of several keys in one round trip; keys never written are left out."""
        ns = check_namespace(namespace)
        found = self.records_of([KeyRef(ns, key) for key in keys])
        return {record.key: record for record in found if record is not None}

    def history(self, key: str, *, namespace: str | None = None) -> list[Record]:
        """The retained earlier versions of a key, newest first."""
        ns, key = check_namespace(namespace), check_key(key)
        with redis_translated():
            entries = self.client.lrange(self.keys_of.history(ns, key), 0, -1)
        return [Record.from_fields(ns, key, _json_fields(entry)) for entry in entries]

    def namespaces(self) -> list[str]:
        with redis_translated():
            return sorted(_text(name) for name in self.client.smembers(self.keys_of.namespaces()))

    def rollback(
        self,
        key: str,
        *,
        namespace: str | None = None,
        version: int | None = None,
        meta: WriteMeta | None = None,
    ) -> WriteResult:
        """Restore the previous version (or `version`, if retained) as a new version.

        Rolling back a key that has a single version deletes it.
        """
        target = "" if version is None else str(version)
        return self._one(Write(_ref(namespace, key), "rollback", meta or WriteMeta(), target))

    @contextmanager
    def key_lock(self, key: str, *, namespace: str | None = None, timeout_ms: int = 30_000) -> Iterator[None]:
        """Hold a short lock on one key (expiring after `timeout_ms`, should its holder die).

        Raises LockLost when the lock expired before the block ended: another writer may have
        taken it meanwhile, so what the block did under it must be redone.
        """
        ns, key = check_namespace(namespace), check_key(key)
        lock = self.client.lock(self.keys_of.lock(ns, key), timeout=timeout_ms / 1000, blocking_timeout=10)
        with redis_translated():
            if not lock.acquire():
                raise StoreUnavailable(f"key {key!r} stayed locked for 10 s")
        try:
            yield
        except BaseException:
            with suppress(redis.RedisError):  # the block's own failure is the one to report
                lock.release()
            raise
        with redis_translated():
            try:
                lock.release()
            except redis.exceptions.LockNotOwnedError as err:
                raise LockLost(f"the lock on key {key!r} expired while its holder still worked") from err

    def revert(self, key: str, msg_id: str, *, namespace: str | None = None) -> bool:
        """Undo the version `msg_id` wrote, if it is still current; True when something was undone."""
        ns, key = check_namespace(namespace), check_key(key)
        keys = [self.keys_of.head(ns, key), self.keys_of.history(ns, key), self.keys_of.key_index(ns)]
        with redis_translated():
            return bool(run_pipelined(self.client, [(self._revert, keys, [key, msg_id])])[0])

    def write_many(
        self, writes: Sequence[Write], *, lock_ttl_ms: int = 8_000
    ) -> list[WriteResult | KVStoreError]:
        """Run each write atomically, all in one round trip; a write's own failure is its item's result.

        A rollback of a missing key, or of a version no longer retained, fails alone. Redis being
        unreachable raises StoreUnavailable for the whole batch.
        """
        calls = [(self._write, self._write_keys(w.ref), self._write_args(w, lock_ttl_ms)) for w in writes]
        with redis_translated():
            replies = run_pipelined(self.client, calls)
        return [_result(w, reply) for w, reply in zip(writes, replies, strict=True)]

    def records_of(self, refs: Sequence[KeyRef]) -> list[Record | None]:
        """The current records of keys in any namespaces, in order, in one round trip (none for no keys)."""
        if not refs:
            return []
        with redis_translated():
            pipe = self.client.pipeline(transaction=False)
            for ref in refs:
                pipe.hgetall(self.keys_of.head(*ref))
            answers = pipe.execute()
        return [
            Record.from_fields(*ref, _decoded(f)) if f else None for ref, f in zip(refs, answers, strict=True)
        ]

    def take_locks(self, refs: Sequence[KeyRef], token: str, ttl_ms: int) -> list[bool]:
        """Try once to take the index lock of each key with `token`; which ones were taken."""
        with redis_translated():
            pipe = self.client.pipeline(transaction=False)
            for ref in refs:
                pipe.set(self.keys_of.lock(*ref), token, nx=True, px=ttl_ms)
            return [bool(taken) for taken in pipe.execute()]

    def release_locks(self, refs: Sequence[KeyRef], token: str) -> list[bool]:
        """Let go of index locks held with `token`; False where the lock had expired meanwhile."""
        calls = [(self._release, [self.keys_of.lock(*ref)], [token]) for ref in refs]
        with redis_translated():
            return [reply == 1 for reply in run_pipelined(self.client, calls)]

    def _one(self, write: Write) -> WriteResult:
        result = self.write_many([write])[0]
        if isinstance(result, KVStoreError):
            raise result
        return result

    def _write_keys(self, ref: KeyRef) -> list[str]:
        ns, key = ref
        k = self.keys_of
        return [k.head(ns, key), k.history(ns, key), k.key_index(ns), k.namespaces(), k.lock(ns, key)]

    def _write_args(self, w: Write, lock_ttl_ms: int) -> list[str | int]:
        meta = w.meta
        return [
            w.ref.key, w.ref.namespace, w.mode, w.payload, "1" if w.embed else "0", w.content_hash,
            meta.msg_id, meta.msg_ts, self._clock(), self.history_length, w.ttl_ms or 0,
            "1" if meta.ordered else "0", w.lock_token, lock_ttl_ms, "1" if w.skip_unchanged else "0",
            w.metadata_json,
        ]  # fmt: skip


def _ref(namespace: str | None, key: str) -> KeyRef:
    return KeyRef(check_namespace(namespace), check_key(key))


def _result(write: Write, reply: Any) -> WriteResult | KVStoreError:
    (ns, key), outcome, lock = write.ref, _text(reply[0]), _text(reply[1])
    fields = _decoded(dict(zip(reply[2::2], reply[3::2], strict=True)))
    if outcome == "missing":
        return KeyNotFound(f"key {key!r} in namespace {ns!r} has never been written")
    if outcome == "no_version":
        return VersionNotFound(f"version {write.payload} of key {key!r} is not retained in its history")
    if outcome == "nothing":
        return NothingToRollBack(f"key {key!r} is deleted and has no earlier version to restore")
    current = Record.from_fields(ns, key, fields) if fields else None
    return WriteResult(Outcome(outcome), current, lock)  # type: ignore[arg-type]


def _decoded(fields: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(name): _text(value) for name, value in fields.items()}


def _json_fields(entry: Any) -> dict[str, str]:
    loaded: dict[str, str] = json.loads(entry)
    return loaded


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
