"""MemoryStore: current values, versions, bounded history and rollback, over Redis."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from importlib import resources
from typing import Any

import redis

from kvstore.errors import KeyNotFound, NothingToRollBack, StoreUnavailable, VersionNotFound
from kvstore.keys import Keys
from kvstore.models import Outcome, Record, WriteResult
from kvstore.validate import canonical_json, check_key, check_namespace

__all__ = ["MemoryStore", "WriteMeta"]

Clock = Callable[[], int]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _script(name: str) -> str:
    return resources.files("kvstore").joinpath(name).read_text(encoding="utf-8")


@contextmanager
def _translated() -> Iterator[None]:
    """Turn redis-py's failures into StoreUnavailable, never with the URL (it may hold a password)."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as err:
        raise StoreUnavailable(f"Redis is unreachable: {type(err).__name__}") from err
    except redis.ResponseError as err:
        raise StoreUnavailable(f"Redis refused a command: {str(err)[:200]}") from err


class WriteMeta:
    """Who is writing: a message id and its send time, which de-duplicate and order writes.

    Without a message (a direct call), a write is unordered: it always applies, as the newest.
    """

    __slots__ = ("msg_id", "msg_ts", "ordered")

    def __init__(self, msg_id: str | None = None, msg_ts: int | None = None) -> None:
        self.ordered = msg_id is not None and msg_ts is not None
        self.msg_id = msg_id or uuid.uuid4().hex
        self.msg_ts = _now_ms() if msg_ts is None else msg_ts


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
        clock: Clock = _now_ms,
    ) -> None:
        self.client = client
        self.keys_of = Keys(prefix)
        self.history_length = history_length
        self.max_value_bytes = max_value_bytes
        self._clock = clock
        self._write = client.register_script(_script("write.lua"))
        self._revert = client.register_script(_script("revert.lua"))

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
    ) -> WriteResult:
        """Write a new version of `key` holding `value` (any JSON)."""
        value_json = canonical_json(value, self.max_value_bytes)
        flags = ("1" if embed else "0", content_hash)
        return self._run("set", key, namespace, value_json, flags, ttl_ms, meta)

    def delete(self, key: str, *, namespace: str | None = None, meta: WriteMeta | None = None) -> WriteResult:
        """Record a deletion as a new version (a rollback restores the value)."""
        return self._run("delete", key, namespace, "", ("0", ""), None, meta)

    def has(self, key: str, *, namespace: str | None = None) -> bool:
        record = self.record(key, namespace=namespace)
        return record is not None and not record.deleted

    def keys(self, *, namespace: str | None = None) -> list[str]:
        """The keys of a namespace that hold a value, sorted; expired keys are left out."""
        ns = check_namespace(namespace)
        with _translated():
            names = [_text(k) for k in self.client.zrange(self.keys_of.key_index(ns), 0, -1)]
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.exists(self.keys_of.head(ns, name))
            alive = pipe.execute()
        return [name for name, exists in zip(names, alive, strict=True) if exists]

    # Versions, history and rollback.

    def record(self, key: str, *, namespace: str | None = None) -> Record | None:
        """The key's current record (a deleted key has one, with no value), or None if never written."""
        ns, key = check_namespace(namespace), check_key(key)
        with _translated():
            fields = self.client.hgetall(self.keys_of.head(ns, key))
        return Record.from_fields(ns, key, _decoded(fields)) if fields else None

    def records(self, keys: list[str], *, namespace: str | None = None) -> dict[str, Record]:
        """The current records of several keys in one round trip; keys never written are left out."""
        ns = check_namespace(namespace)
        with _translated():
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(self.keys_of.head(ns, key))
            answers = pipe.execute()
        return {k: Record.from_fields(ns, k, _decoded(f)) for k, f in zip(keys, answers, strict=True) if f}

    def history(self, key: str, *, namespace: str | None = None) -> list[Record]:
        """The retained earlier versions of a key, newest first."""
        ns, key = check_namespace(namespace), check_key(key)
        with _translated():
            entries = self.client.lrange(self.keys_of.history(ns, key), 0, -1)
        return [Record.from_fields(ns, key, _json_fields(entry)) for entry in entries]

    def namespaces(self) -> list[str]:
        with _translated():
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
        return self._run("rollback", key, namespace, target, ("0", ""), None, meta)

    @contextmanager
    def key_lock(self, key: str, *, namespace: str | None = None, timeout_ms: int = 30_000) -> Iterator[None]:
        """Hold a short lock on one key (expiring after `timeout_ms`, should its holder die)."""
        ns, key = check_namespace(namespace), check_key(key)
        lock = self.client.lock(self.keys_of.lock(ns, key), timeout=timeout_ms / 1000, blocking_timeout=10)
        with _translated():
            if not lock.acquire():
                raise StoreUnavailable(f"key {key!r} stayed locked for 10 s")
        try:
            yield
        finally:
            with _translated(), suppress(redis.exceptions.LockError):
                lock.release()

    def revert(self, key: str, msg_id: str, *, namespace: str | None = None) -> bool:
        """Undo the version `msg_id` wrote, if it is still current; True when something was undone."""
        ns, key = check_namespace(namespace), check_key(key)
        keys = [self.keys_of.head(ns, key), self.keys_of.history(ns, key), self.keys_of.key_index(ns)]
        with _translated():
            return bool(self._revert(keys=keys, args=[key, msg_id]))

    def _run(
        self,
        mode: str,
        key: str,
        namespace: str | None,
        payload: str,
        flags: tuple[str, str],
        ttl_ms: int | None,
        meta: WriteMeta | None,
    ) -> WriteResult:
        ns, key, meta = check_namespace(namespace), check_key(key), meta or WriteMeta()
        keys = [
            self.keys_of.head(ns, key),
            self.keys_of.history(ns, key),
            self.keys_of.key_index(ns),
            self.keys_of.namespaces(),
        ]
        args: list[str | int] = [key, ns, mode, payload, *flags, meta.msg_id, meta.msg_ts, self._clock()]
        args += [self.history_length, ttl_ms or 0, "1" if meta.ordered else "0"]
        with _translated():
            reply = self._write(keys=keys, args=args)
        return _result(ns, key, version_asked=payload if mode == "rollback" else "", reply=reply)


def _result(ns: str, key: str, *, version_asked: str, reply: list[bytes]) -> WriteResult:
    outcome, had_vector = _text(reply[0]), _text(reply[1]) == "1"
    fields = _decoded(dict(zip(reply[2::2], reply[3::2], strict=True)))
    if outcome == "missing":
        raise KeyNotFound(f"key {key!r} in namespace {ns!r} has never been written")
    if outcome == "no_version":
        raise VersionNotFound(f"version {version_asked} of key {key!r} is not retained in its history")
    if outcome == "nothing":
        raise NothingToRollBack(f"key {key!r} is deleted and has no earlier version to restore")
    current = Record.from_fields(ns, key, fields) if fields else None
    return WriteResult(Outcome(outcome), current, had_vector)


def _decoded(fields: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(name): _text(value) for name, value in fields.items()}


def _json_fields(entry: Any) -> dict[str, str]:
    loaded: dict[str, str] = json.loads(entry)
    return loaded


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
