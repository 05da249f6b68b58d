"""The records kvstore returns."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["Outcome", "Record", "WriteResult"]


class Outcome(StrEnum):
    """What an atomic write did."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  # this message id wrote the current version already
    STALE = "stale"  # a newer message (by send time) wrote the key already


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

    @property
    def deleted(self) -> bool:
        return self.value_json is None

    @property
    def value(self) -> Any:
        return None if self.value_json is None else json.loads(self.value_json)

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
        )


@dataclass(frozen=True)
class WriteResult:
    """The outcome of a write or rollback, and the key's current record after it."""

    outcome: Outcome
    current: Record | None
    #: Whether the key may have had a vector before this write (so the index step has work to do).
    had_vector: bool = True
