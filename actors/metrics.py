"""Prometheus metrics: memsync's own series, served beside Dramatiq's from one port per worker group.

With `MEMSYNC_METRICS_PORT` set, the broker gets Dramatiq's Prometheus middleware (as
`actors.exposition.Exposition`), and the worker's main process serves on that port every series its
worker processes record. prometheus_client then runs in multiprocess mode: each worker process
writes its values to files in one directory per port, and the server sums them at each scrape.

Labels hold only names from the code (outcomes, embedder kinds, results): never a key, a namespace
or a value, since keys can be personal and namespaces are unbounded.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvstore.models import Outcome, now_ms
from vectorstore.errors import EmbeddingRejected
from vectorstore.observer import NO_OBSERVER, Observer

if TYPE_CHECKING:
    import dramatiq
    from prometheus_client import CollectorRegistry

    from settings import Settings

__all__ = [
    "ROLLBACK_OUTCOMES",
    "SYNC_OUTCOMES",
    "Metrics",
    "export_environment",
    "forget_dead_processes",
    "metrics_dir",
    "middleware",
    "observer",
    "serve",
    "shared",
]

#: What a sync can end as: a write's outcome, or failed for good.
SYNC_OUTCOMES = (*(outcome.value for outcome in Outcome), "failed")
#: What a rollback can end as (it never skips an identical value).
ROLLBACK_OUTCOMES = tuple(name for name in SYNC_OUTCOMES if name != Outcome.UNCHANGED)
#: Send-to-applied buckets in milliseconds (the unit of Dramatiq's own histogram), up to an hour.
DELAY_BUCKETS_MS = (
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000,
    3_600_000, math.inf,
)  # fmt: skip
_KINDS = {"memory_sync": "sync", "memory_sync_batch": "sync", "memory_rollback": "rollback"}
_PID_OF_FILE = re.compile(r"_(\d+)\.db$")

logger = logging.getLogger("memsync.metrics")


def middleware(settings: Settings) -> list[dramatiq.Middleware]:
    """Dramatiq's Prometheus middleware on memsync's settings; none when `MEMSYNC_METRICS_PORT` is unset."""
    if settings.metrics_port is None:
        return []
    export_environment(settings)
    from actors.exposition import Exposition  # Dramatiq's module reads the variables when imported

    return [Exposition()]


def metrics_dir(port: int) -> Path:
    """Where the worker processes of the group serving on `port` keep their values."""
    return Path(tempfile.gettempdir()) / f"memsync-metrics-{port}"


def export_environment(settings: Settings) -> None:
    """Set the variables Dramatiq's Prometheus module reads when it is imported: port, host, directory."""
    if settings.metrics_port is None:
        raise ValueError("MEMSYNC_METRICS_PORT is not set")
    os.environ.update(
        dramatiq_prom_port=str(settings.metrics_port),
        dramatiq_prom_host=settings.metrics_host,
        dramatiq_prom_db=str(metrics_dir(settings.metrics_port)),
    )


def serve() -> int:
    """Serve the group's metrics over HTTP until stopped, in a process Dramatiq's main process forks.

    The main process never reads memsync's settings, so this reads them before Dramatiq's module
    is imported. A port that cannot be bound is one line in the log; the workers go on without it.
    """
    from settings import load_settings

    settings = load_settings()
    export_environment(settings)
    from dramatiq.middleware.prometheus import _run_exposition_server

    try:
        code: int = _run_exposition_server()  # type: ignore[no-untyped-call]
    except OSError as error:
        logger.error(
            "cannot serve metrics on %s:%s (%s): give each worker group on a machine its own "
            "MEMSYNC_METRICS_PORT", settings.metrics_host, settings.metrics_port, error.strerror or error,
        )  # fmt: skip
        return 1
    return code


def forget_dead_processes(directory: Path) -> None:
    """Delete the value files of processes that no longer run (an earlier run's), so they stop counting."""
    for path in directory.glob("*.db"):
        match = _PID_OF_FILE.search(path.name)
        if match and not _running(int(match.group(1))):
            path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Metrics(Observer):
    """memsync's series in a prometheus_client registry, and the Observer that vectorstore reports to."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        import prometheus_client as prom  # imported late: multiprocess mode is chosen at its import

        self.registry = registry = prom.REGISTRY if registry is None else registry
        self.syncs = prom.Counter(
            "memsync_syncs", "Syncs finished, by outcome (a batch counts each item).", ["outcome"],
            registry=registry,
        )  # fmt: skip
        self.rollbacks = prom.Counter(
            "memsync_rollbacks", "Rollbacks finished, by outcome.", ["outcome"], registry=registry
        )
        self.send_to_applied = prom.Histogram(
            "memsync_send_to_applied_milliseconds",
            "Time from a sync's send to its write applied, in milliseconds (retries included).",
            buckets=DELAY_BUCKETS_MS,
            registry=registry,
        )
        self.requests = prom.Counter(
            "memsync_embedding_requests", "Embedding requests, by embedder and result.",
            ["embedder", "result"], registry=registry,
        )  # fmt: skip
        self.inputs = prom.Counter(
            "memsync_embedding_inputs", "Texts embedded (inputs of answered requests).", ["embedder"],
            registry=registry,
        )  # fmt: skip
        self.tokens = prom.Counter(
            "memsync_embedding_tokens", "Tokens the embedding server reported reading (usage.prompt_tokens).",
            ["embedder"], registry=registry,
        )  # fmt: skip
        self.skipped = prom.Counter(
            "memsync_embeddings_skipped", "Texts not embedded: the index held a vector of the same text.",
            registry=registry,
        )  # fmt: skip
        self.stale_hits = prom.Counter(
            "memsync_search_stale_hits_dropped",
            "Index entries a search dropped: their key was gone or held a newer version.",
            registry=registry,
        )
        for outcome in SYNC_OUTCOMES:  # every outcome shows from the start, at 0
            self.syncs.labels(outcome)
        for outcome in ROLLBACK_OUTCOMES:
            self.rollbacks.labels(outcome)

    # The Observer of vectorstore.

    def embedding_request(
        self, embedder: str, inputs: int, tokens: int | None, error: Exception | None = None
    ) -> None:
        self.requests.labels(embedder, _result(error)).inc()
        if error is None:
            self.inputs.labels(embedder).inc(inputs)
        if tokens is not None:
            self.tokens.labels(embedder).inc(tokens)

    def embeddings_skipped(self, inputs: int) -> None:
        self.skipped.inc(inputs)

    def stale_hits_dropped(self, hits: int) -> None:
        self.stale_hits.inc(hits)

    # Messages.

    def message_finished(self, message: Any, result: Any, failed: bool) -> None:
        """Count what a finished memsync message did: its outcomes, or its items failed for good.

        `failed`: the message failed for good (a failure to be retried is not counted: its retry is).
        """
        kind = _KINDS.get(message.actor_name)
        if kind is None:
            return
        outcomes = _outcomes(message, result, failed)
        counter = self.syncs if kind == "sync" else self.rollbacks
        for outcome, count in outcomes.items():
            counter.labels(outcome).inc(count)
        if kind == "sync" and outcomes[Outcome.APPLIED]:
            delay_ms = max(0, now_ms() - int(message.message_timestamp))
            for _ in range(outcomes[Outcome.APPLIED]):
                self.send_to_applied.observe(delay_ms)


def _result(error: Exception | None) -> str:
    if error is None:
        return "ok"
    return "rejected" if isinstance(error, EmbeddingRejected) else "unavailable"


def _outcomes(message: Any, result: Any, failed: bool) -> Counter[str]:
    """The outcomes of a message's syncs or rollback, from its result (see `actors.outcomes.answer`)."""
    if message.actor_name == "memory_sync_batch":
        if failed:
            return _failed_batch(message)
        counts = result.get("counts") if isinstance(result, Mapping) else None
        return Counter({name: n for name, n in (counts or {}).items() if name in SYNC_OUTCOMES and n})
    if failed:
        return Counter(failed=1)
    outcome = result.get("outcome") if isinstance(result, Mapping) else None
    return Counter({outcome: 1}) if outcome in SYNC_OUTCOMES else Counter()


def _failed_batch(message: Any) -> Counter[str]:
    """A batch that failed for good: its finished items' outcomes, and every other item failed."""
    from actors.batch import DONE_OPTION  # not at the top: actors.batch needs the runtime, which needs this

    done = message.options.get(DONE_OPTION) or {}
    answers = [a for a in done.values() if isinstance(a, Mapping)]
    outcomes = Counter(str(a.get("outcome")) if a.get("status") == "success" else "failed" for a in answers)
    items = message.kwargs.get("items", message.args[0] if message.args else None)
    unfinished = len(items) - len(answers) if isinstance(items, list) else 1
    outcomes["failed"] += max(unfinished, 0)
    return Counter({name: n for name, n in outcomes.items() if name in SYNC_OUTCOMES and n})


_shared: Metrics | None = None
_lock = threading.Lock()


def shared() -> Metrics:
    """This process's series in prometheus_client's default registry, made on first use."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = Metrics()
        return _shared


def observer(settings: Settings) -> Observer:
    """What vectorstore reports to in this process: the shared series when metrics are on."""
    return shared() if settings.metrics_port is not None else NO_OBSERVER
