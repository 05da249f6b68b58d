"""The errors of kvstore; foreign (redis) errors are translated here, at the boundary."""

from __future__ import annotations

__all__ = [
    "InvalidKey",
    "InvalidValue",
    "KVStoreError",
    "KeyNotFound",
    "LockLost",
    "NothingToRollBack",
    "StoreUnavailable",
    "ValueTooLarge",
    "VersionNotFound",
]


class KVStoreError(Exception):
    """Raised when kvstore cannot do what it was asked; the root of this package's errors."""


class InvalidKey(KVStoreError):
    """Raised when a key or namespace is empty, too long, of the wrong type or holds control characters."""


class InvalidValue(KVStoreError):
    """Raised when a value is not JSON (NaN, Infinity, bytes, non-string object keys, too deep)."""


class ValueTooLarge(InvalidValue):
    """Raised when a value's canonical JSON is larger than the configured limit."""


class KeyNotFound(KVStoreError):
    """Raised when a rollback names a key that has never been written."""


class VersionNotFound(KVStoreError):
    """Raised when a rollback names a version that is not retained in the key's history."""


class NothingToRollBack(KVStoreError):
    """Raised when a rollback finds no earlier version to restore (the key is already deleted)."""


class StoreUnavailable(KVStoreError):
    """Raised when Redis cannot be reached or answers with a server-side failure; worth retrying."""


class LockLost(StoreUnavailable):
    """Raised when a key's index lock expired while its holder still worked; the step is redone on retry."""
