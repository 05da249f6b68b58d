"""The records kvstore takes and returns."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, NamedTuple

__all__ = ["Census", "KeyRef", "Outcome", "Record", "Write", "WriteMeta", "WriteResult"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Census:
    """How many keys of a namespace hold a value (expired ones left out), and how many are embedded."""

    namespace: str
    memories: int
    embedded: int

    def add(self, embed_flags: list[Any]) -> Census:
        """This census with more live keys, given their stored embed flags ("1" or b"1" when embedded)."""
        embedded = sum(1 for flag in embed_flags if flag in ("1", b"1"))
        return Census(self.namespace, self.memories + len(embed_flags), self.embedded + embedded)


class KeyRef(NamedTuple):
    """A key and the namespace it lives in."""

    namespace: str
    key: str


class Outcome(StrEnum):
    """What an atomic write did."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  # this message id wrote the current version already
    STALE = "stale"  # a newer message (by send time) wrote the key already
    UNCHANGED = "unchanged"  # asked to skip an identical value, and the current one is identical


class WriteMeta:
    """Who is writing: a message id and its send time, which de-duplicate and order writes.

    Without a message (a direct call), a write is unordered: it always applies, as the newest.
    """

    __slots__ = ("msg_id", "msg_ts", "ordered")

    def __init__(self, msg_id: str | None = None, msg_ts: int | None = None) -> None:
        self.ordered = msg_id is not None and msg_ts is not None
        self.msg_id = msg_id or uuid.uuid4().hex
        self.msg_ts = now_ms() if msg_ts is None else msg_ts

    def item(self, position: int) -> WriteMeta:
        """The meta of item `position` of a batch this message carries: its own id, the same send time.

        Ids sort in item order, so of two items for one key (same send time), the later one wins.
        """
        meta = WriteMeta(f"{self.msg_id}:{position:05d}", self.msg_ts)
        meta.ordered = self.ordered
        return meta


@dataclass(frozen=True)
class Write:
    """One atomic write: a set, a delete or a rollback of one key.

    `lock_token`: when set, the write also takes the key's index lock with this token if the index
    has work to do for the key (see `WriteResult.lock`).
    """

    ref: KeyRef
    mode: Literal["set", "delete", "rollback"]
    meta: WriteMeta
    payload: str = ""  # set: the value's canonical JSON; rollback: the version to restore, or ""
    embed: bool = False
    content_hash: str = ""
    ttl_ms: int | None = None
    lock_token: str = ""
    skip_unchanged: bool = False
    metadata_json: str = ""  # set: the metadata's canonical JSON, "" for none


@dataclass(frozen=True)
class Record:
    """One version of a key: its value (None when `deleted`), and the message that wrote it."""

    namespace: str
    key: str
    version: int
    value_json: str | None
    embed: bool
    content_hash: str
    msg_id: str
    msg_ts: int
    at_ms: int
    metadata_json: str = ""

    @property
    def deleted(self) -> bool:
        return self.value_json is None

    @property
    def value(self) -> Any:
        return None if self.value_json is None else json.loads(self.value_json)

    @property
    def metadata(self) -> dict[str, str | int | float | bool]:
        """The version's metadata ({} when it has none)."""
        return json.loads(self.metadata_json) if self.metadata_json else {}

    @property
    def ref(self) -> KeyRef:
        return KeyRef(self.namespace, self.key)

    @classmethod
    def from_fields(cls, namespace: str, key: str, fields: dict[str, str]) -> Record:
        """Build a record from a head hash or a history entry, both of which store strings."""
        return cls(
            namespace=namespace,
            key=key,
            version=int(fields["version"]),
            value_json=fields.get("value"),
            embed=fields.get("embed") == "1",
            content_hash=fields.get("hash", ""),
            msg_id=fields.get("msg_id", ""),
            msg_ts=int(fields.get("msg_ts", "0")),
            at_ms=int(fields.get("at_ms", "0")),
            metadata_json=fields.get("meta", ""),
        )


@dataclass(frozen=True)
class WriteResult:
    """The outcome of a write or rollback, and the key's current record after it.

    `lock`: "held" when the write took the key's index lock (the index has work to do and the
    writer owns the step), "busy" when the index has work but another holder has the lock, ""
    when the index has nothing to do for this write (or no lock was asked for).
    """

    outcome: Outcome
    current: Record | None
    lock: Literal["held", "busy", ""] = ""

    @property
    def needs_index(self) -> bool:
        return self.lock != ""
