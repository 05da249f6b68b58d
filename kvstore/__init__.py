"""kvstore: the truth of memsync. Versioned JSON values in Redis, with bounded history and rollback."""

from __future__ import annotations

from kvstore.errors import (
    InvalidKey,
    InvalidValue,
    KeyNotFound,
    KVStoreError,
    LockLost,
    NothingToRollBack,
    StoreUnavailable,
    ValueTooLarge,
    VersionNotFound,
)
from kvstore.keys import Keys
from kvstore.models import KeyRef, Outcome, Record, Write, WriteMeta, WriteResult
from kvstore.store import MemoryStore
from kvstore.validate import DEFAULT_NAMESPACE, canonical_json, check_key, check_namespace, content_hash

__all__ = [
    "DEFAULT_NAMESPACE",
    "InvalidKey",
    "InvalidValue",
    "KVStoreError",
    "KeyNotFound",
    "KeyRef",
    "Keys",
    "LockLost",
    "MemoryStore",
    "NothingToRollBack",
    "Outcome",
    "Record",
    "StoreUnavailable",
    "ValueTooLarge",
    "VersionNotFound",
    "Write",
    "WriteMeta",
    "WriteResult",
    "canonical_json",
    "check_key",
    "check_namespace",
    "content_hash",
]
