"""kvstore: the truth of memsync. Versioned JSON values in Redis, with bounded history and rollback."""

from __future__ import annotations

from kvstore.errors import (
    InvalidFilter,
    InvalidKey,
    InvalidMetadata,
    InvalidValue,
    KeyNotFound,
    KVStoreError,
    LockLost,
    MemsyncError,
    NothingToRollBack,
    RedisServerMissing,
    StoreUnavailable,
    StoreUnreachable,
    ValueTooLarge,
    VersionNotFound,
)
from kvstore.keys import BrokerKeys, Keys
from kvstore.listing import Page, list_memories
from kvstore.models import Census, KeyRef, Outcome, Record, Write, WriteMeta, WriteResult
from kvstore.store import MemoryStore, redis_translated
from kvstore.validate import (
    DEFAULT_NAMESPACE,
    Scalar,
    canonical_json,
    check_key,
    check_metadata,
    check_namespace,
    content_hash,
    metadata_json,
    same_metadata,
)

__all__ = [
    "DEFAULT_NAMESPACE",
    "BrokerKeys",
    "Census",
    "InvalidFilter",
    "InvalidKey",
    "InvalidMetadata",
    "InvalidValue",
    "KVStoreError",
    "KeyNotFound",
    "KeyRef",
    "Keys",
    "LockLost",
    "MemoryStore",
    "MemsyncError",
    "NothingToRollBack",
    "Outcome",
    "Page",
    "Record",
    "RedisServerMissing",
    "Scalar",
    "StoreUnavailable",
    "StoreUnreachable",
    "ValueTooLarge",
    "VersionNotFound",
    "Write",
    "WriteMeta",
    "WriteResult",
    "canonical_json",
    "check_key",
    "check_metadata",
    "check_namespace",
    "content_hash",
    "list_memories",
    "metadata_json",
    "redis_translated",
    "same_metadata",
]
