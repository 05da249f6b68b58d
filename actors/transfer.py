"""Bulk import and export of memories as JSON Lines, one `{key, value, embed, namespace, metadata}` a line.

`import` sends `memory_sync_batch` messages with `skip_unchanged`, so a memory whose key already
holds the same value and metadata makes no new version and costs no embedding: an import stopped halfway and
run again applies nothing twice. `export` writes what `import` reads back unchanged.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from actors.batch import perform_batch
from actors.errors import ActorsError
from actors.liveness import live_workers
from actors.runtime import Runtime
from actors.views import export_item
from kvstore import WriteMeta

__all__ = ["Bar", "ImportSummary", "NoWorker", "export_lines", "import_lines", "read_lines", "workers_alive"]

#: The longest wait for one batch's result.
RESULT_TIMEOUT_MS = 600_000
_FAILURES_SHOWN = 20


class NoWorker(ActorsError):
    """Raised when an import would send to workers, and none has beaten its heartbeat lately."""


@dataclass
class ImportSummary:
    """What an import did: counts by outcome, and the first failures with their line numbers."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def add(self, line: int, result: dict[str, Any]) -> None:
        outcome = result["outcome"] if result["status"] == "success" else "failed"
        self.counts[outcome] += 1
        if outcome == "failed" and len(self.failures) < _FAILURES_SHOWN:
            self.failures.append(f"line {line}: {result.get('key')!r}: {result['error']}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        names = ("applied", "unchanged", "duplicate", "stale", "failed")
        return {**{name: self.counts.get(name, 0) for name in names}, "failures": self.failures}


Line = tuple[int, Any]  # (line number, the parsed object or the reason it is not one)
Progress = Callable[[ImportSummary], None]


def read_lines(source: TextIO) -> Iterator[Line]:
    """Each non-blank line's number and object; a line that is not a JSON object yields a failure reason."""
    for number, text in enumerate(source, start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError as error:
            yield number, _NotAnItem(f"not JSON ({error})")
            continue
        yield number, value if isinstance(value, dict) else _NotAnItem("not a JSON object")


@dataclass(frozen=True)
class _NotAnItem:
    reason: str


def import_lines(
    lines: Iterable[Line],
    runtime: Runtime,
    *,
    batch_size: int,
    in_process: bool,
    in_flight: int = 4,
    progress: Progress | None = None,
) -> ImportSummary:
    """Sync every item in batches, through the workers (or in this process); what happened to each."""
    summary = ImportSummary()
    waiting: deque[tuple[list[int], Callable[[], dict[str, Any]]]] = deque()
    for numbers, items in _batches(lines, batch_size, summary):
        waiting.append((numbers, _run(items, runtime, in_process)))
        while len(waiting) >= in_flight or (waiting and in_process):
            _collect(waiting.popleft(), summary, progress)
    while waiting:
        _collect(waiting.popleft(), summary, progress)
    return summary


def _batches(
    lines: Iterable[Line], size: int, summary: ImportSummary
) -> Iterator[tuple[list[int], list[Any]]]:
    numbers: list[int] = []
    items: list[Any] = []
    for number, item in lines:
        if isinstance(item, _NotAnItem):
            summary.add(number, {"status": "failed", "key": None, "error": item.reason})
            continue
        numbers.append(number)
        items.append(item)
        if len(items) == size:
            yield numbers, items
            numbers, items = [], []
    if items:
        yield numbers, items


def _run(items: list[Any], runtime: Runtime, in_process: bool) -> Callable[[], dict[str, Any]]:
    """Start one batch; a function that waits for its result."""
    if in_process:
        meta = WriteMeta(f"import-{time.time_ns()}", time.time_ns() // 1_000_000)
        result = _in_process(items, meta, runtime)
        return lambda: result
    from actors.tasks import memory_sync_batch

    message = memory_sync_batch.send(items=items, skip_unchanged=True)
    return lambda: dict(message.get_result(block=True, timeout=RESULT_TIMEOUT_MS))


def _in_process(items: list[Any], meta: WriteMeta, runtime: Runtime) -> dict[str, Any]:
    retries = 0
    while True:
        try:
            return perform_batch((), {"items": items, "skip_unchanged": True}, meta, retries, runtime=runtime)
        except Exception as error:
            delay = runtime.policy.delay_ms(error, retries)
            if delay is None:
                raise
            retries += 1
            time.sleep(delay / 1000)


def _collect(
    batch: tuple[list[int], Callable[[], dict[str, Any]]], summary: ImportSummary, progress: Progress | None
) -> None:
    numbers, wait = batch
    for number, result in zip(numbers, wait()["results"], strict=True):
        summary.add(number, result)
    if progress is not None:
        progress(summary)


def workers_alive(runtime: Runtime) -> int:
    """How many worker processes have beaten their heartbeat within the heartbeat timeout (either broker)."""
    return len(live_workers(runtime.redis, runtime.keys.workers(), runtime.settings.heartbeat_timeout_ms))


def export_lines(runtime: Runtime, namespaces: list[str] | None, out: TextIO, page: int = 500) -> int:
    """Write the current value of every live key of the namespaces (all by default); how many."""
    store, written = runtime.store, 0
    for namespace in namespaces or store.namespaces():
        keys = store.keys(namespace=namespace)
        for start in range(0, len(keys), page):
            records = store.records(keys[start : start + page], namespace=namespace)
            for record in records.values():
                if record.deleted:
                    continue
                out.write(json.dumps(export_item(record), ensure_ascii=False) + "\n")
                written += 1
    return written


class Bar:
    """A one-line progress bar on a terminal: items done, items/s and, when the total is known, the ETA."""

    def __init__(self, total: int | None, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.started = time.monotonic()

    def __call__(self, summary: ImportSummary) -> None:
        self.show(summary.total)

    def show(self, done: int, since: int = 0) -> None:
        """Draw `done` items, the rate counting those past `since` (what a resumed run found done)."""
        rate = (done - since) / max(time.monotonic() - self.started, 1e-9)
        line = f"\r{done}" + (f"/{self.total}" if self.total else "") + f" items  {rate:,.0f} items/s"
        if self.total and rate > 0:
            line += f"  ETA {max(self.total - done, 0) / rate:,.0f} s"
        self.stream.write(line.ljust(60))
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
