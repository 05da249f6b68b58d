"""Coalescing: concurrent single syncs in one worker process share one batch.

Each Dramatiq worker thread runs one message at a time. A thread whose sync finds no open group
opens one and leads it: it waits up to the window (or until the group is full), closes it, runs
the whole group as one batch (one Redis read, one embedding request, one Redis write, one Chroma
upsert), and hands each thread its own item's result. The other threads wait for their result, so
every message is still acknowledged only once its own item is durable, and an item's error is
raised only in the thread of the message it belongs to.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvstore import WriteResult
from vectorstore import ItemResult, SyncItem

__all__ = ["Coalescer"]

BatchRunner = Callable[[Sequence[SyncItem]], list[ItemResult]]


@dataclass
class _Group:
    items: list[SyncItem] = field(default_factory=list)
    results: list[ItemResult] = field(default_factory=list)
    full: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class Coalescer:
    """Runs single syncs in shared batches of at most `max_items`, gathered for up to `window_ms`.

    With `window_ms` 0, every sync is a batch of its own; so is every sync without `embed`, which
    has no embedding request or Chroma upsert to share and would only wait for the window.
    """

    def __init__(self, run: BatchRunner, *, window_ms: int, max_items: int) -> None:
        self.run = run
        self.window_ms = window_ms
        self.max_items = max_items
        self._lock = threading.Lock()
        self._open: _Group | None = None

    def sync(self, item: SyncItem) -> WriteResult:
        """Sync one item, in a batch with whatever other threads sync meanwhile; its own result."""
        if self.window_ms <= 0 or not item.embed:  # a plain sync has no request or upsert to share
            return _raised(self.run([item])[0])
        group, position, leads = self._join(item)
        if leads:
            self._lead(group)
        else:
            group.done.wait()
        result = group.results[position]
        # An error shared by several items is raised in several threads: each raises its own copy.
        return _raised(copy.copy(result) if isinstance(result, Exception) else result)

    def _join(self, item: SyncItem) -> tuple[_Group, int, bool]:
        with self._lock:
            leads = self._open is None
            if self._open is None:
                self._open = _Group()
            group = self._open
            group.items.append(item)
            if len(group.items) >= self.max_items:
                self._open = None
                group.full.set()
            return group, len(group.items) - 1, leads

    def _lead(self, group: _Group) -> None:
        try:
            group.full.wait(self.window_ms / 1000)
            with self._lock:
                if self._open is group:
                    self._open = None
            group.results = self._results(group.items)
        finally:  # followers must never wait forever, even if this thread is interrupted
            if len(group.results) != len(group.items):
                interrupted = RuntimeError("the batch this sync shared was interrupted; it is retried")
                group.results = [interrupted] * len(group.items)
            group.done.set()

    def _results(self, items: list[SyncItem]) -> list[ItemResult]:
        try:
            return self.run(items)
        except Exception as error:  # a failure of the whole batch is every item's failure
            return [error] * len(items)


def _raised(result: ItemResult) -> WriteResult:
    if isinstance(result, Exception):
        raise result
    return result
