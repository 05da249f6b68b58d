"""Listing without a query: the current memories of a namespace that match a filter, a page at a time."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvstore.errors import InvalidFilter
from kvstore.filters import check_where, matches
from kvstore.models import KeyRef, Record
from kvstore.store import MemoryStore
from kvstore.validate import check_namespace

__all__ = ["MAX_LIMIT", "SCAN_BUDGET", "Page", "list_memories"]

#: The most memories one page holds.
MAX_LIMIT = 1000
#: The most keys one call reads: a filter that keeps few memories returns a short page (even an
#: empty one) with a cursor, rather than reading a whole large namespace in one call.
SCAN_BUDGET = 10_000
_READ = 500


@dataclass(frozen=True)
class Page:
    """Memories in key order, and the cursor of the next page (None when the namespace has no more)."""

    memories: list[Record]
    cursor: str | None


def list_memories(
    store: MemoryStore,
    namespace: str | None = None,
    where: Mapping[str, Any] | None = None,
    *,
    limit: int = 100,
    cursor: str | None = None,
) -> Page:
    """The current memories of a namespace whose metadata matches `where`, in key order, from `cursor`.

    Reads the key index in order, one round trip per 500 keys for the list and one for their
    records; deleted and expired keys are left out.
    """
    ns, checked = check_namespace(namespace), check_where(where)
    _check_limit(limit)
    after, scanned = _after(cursor), 0
    found: list[Record] = []
    while len(found) < limit and scanned < SCAN_BUDGET:
        names = store.keys_after(ns, after, min(_READ, SCAN_BUDGET - scanned))
        if not names:
            return Page(found, None)
        records = store.records_of([KeyRef(ns, name) for name in names])
        for name, record in zip(names, records, strict=True):
            after, scanned = name, scanned + 1
            if record is not None and not record.deleted and matches(checked, record.metadata):
                found.append(record)
                if len(found) == limit:
                    break
    return Page(found, _cursor(after))


def _check_limit(limit: object) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidFilter(f"limit must be an integer from 1 to {MAX_LIMIT}")


def _cursor(after: str) -> str:
    return base64.urlsafe_b64encode(after.encode("utf-8")).decode("ascii")


def _after(cursor: object) -> str:
    """The key a cursor names: the last one the previous page read ("" for the first page)."""
    if cursor is None or cursor == "":
        return ""
    if not isinstance(cursor, str):
        raise InvalidFilter(f"cursor must be a string, not {type(cursor).__name__}")
    try:
        return base64.b64decode(cursor.encode("ascii"), altchars=b"-_", validate=True).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError):
        raise InvalidFilter("cursor is not one a page of memories gave") from None
