"""The errors of kvstore; foreign (redis) errors are translated here, at the boundary."""

from __future__ import annotations

__all__ = [
    "InvalidFilter",
    "InvalidKey",
    "InvalidMetadata",
    "InvalidValue",
    "KVStoreError",
    "KeyNotFound",
    "LockLost",
    "MemsyncError",
    "NothingToRollBack",
    "RedisServerMissing",
    "StoreUnavailable",
    "StoreUnreachable",
    "ValueTooLarge",
    "VersionNotFound",
]


class MemsyncError(Exception):
    """The root of every error memsync raises: each package's root derives from it."""


class KVStoreError(MemsyncError):
    """Raised when kvstore cannot do what it was asked; the root of this package's errors."""


class InvalidFilter(KVStoreError):
    """Raised when a metadata filter, or a listing's limit or cursor, is malformed."""


class InvalidKey(KVStoreError):
    """Raised when a key or namespace is empty, too long, of the wrong type or holds control characters."""


class InvalidValue(KVStoreError):
    """Raised when a value is not JSON (NaN, Infinity, bytes, non-string object keys, too deep)."""


class ValueTooLarge(InvalidValue):
    """Raised when a value's canonical JSON is larger than the configured limit."""


class InvalidMetadata(InvalidValue):
    """Raised when metadata is not a flat object of bounded string, number and boolean values."""


class KeyNotFound(KVStoreError):
    """Raised when a rollback names a key that has never been written."""


class VersionNotFound(KVStoreError):
    """Raised when a rollback names a version that is not retained in the key's history."""


class NothingToRollBack(KVStoreError):
    """Raised when a rollback finds no earlier version to restore (the key is already deleted)."""


class RedisServerMissing(KVStoreError):
    """Raised when the embedded Redis is to be started and no redis-server binary is installed."""


class StoreUnavailable(KVStoreError):
    """Raised when Redis cannot be reached or answers with a server-side failure; worth retrying."""


class StoreUnreachable(StoreUnavailable):
    """Raised when Redis cannot be reached at all (refused, timed out, still loading its data)."""


class LockLost(StoreUnavailable):
    """Raised when a key's index lock expired while its holder still worked; the step is redone on retry."""
