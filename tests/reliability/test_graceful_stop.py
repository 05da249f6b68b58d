"""Scenario 2, graceful stop: SIGTERM twice to every process of the worker, mid-task, as honcho and Heroku do.

Syncs with embeddings and rollbacks run in chains per key. The Procfile worker (two processes of
two threads) is started and, while it embeds, its whole process group gets SIGTERM twice, several
times over. Each time the worker must exit by itself with status 0, every message it had fetched
must be either finished (its result stored) or back on the queue, and none may be left behind in
a stopped worker's hands waiting for the dead-worker timeout. The end state must pass every invariant.
"""

from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

import actors  # noqa: F401  (builds the broker the messages go through)
from actors import state
from tests.reliability.conftest import Report
from tests.reliability.invariants import check_invariants
from tests.reliability.workload import (
    Chains,
    Model,
    broker_view,
    check_dead_letter_errors,
    check_results,
    drive,
    mixed_chains,
    settle,
)
from tests.support.embedding_server import EmbeddingServer
from tests.support.worker import READY_LINE, group_members, running_worker, signal_group

SEED = 2_000_003
STOPS = 5
KEYS = 24
PROCESSES = 2
#: Long enough that a SIGTERM sent after a request arrives finds the message running.
EMBEDDING_LATENCY_MS = 800
SHUTDOWN_TIMEOUT_MS = 15_000
WORKER_ENV = {
    "MEMSYNC_PROCESSES": str(PROCESSES),
    "MEMSYNC_THREADS": "2",
    "MEMSYNC_SHUTDOWN_TIMEOUT_MS": str(SHUTDOWN_TIMEOUT_MS),
}
#: The first SIGTERM comes this long (drawn at random) after an embedding request arrives...
STOP_AFTER_S = (0.0, 0.4)
#: ...and the second this long after the first.
SECOND_SIGTERM_AFTER_S = (0.05, 0.5)


@dataclass(frozen=True)
class Stop:
    """One double SIGTERM: what the worker held, what finished or went back, what it left behind."""

    returncode: int
    exit_s: float
    in_flight: frozenset[str]  # fetched by the worker and not acknowledged, just before the first SIGTERM
    unfinished: frozenset[str]  # of those, the ones without a result then (running, or prefetched)
    finished: frozenset[str]  # of those in flight, the ones with a result once the worker had exited
    requeued: frozenset[str]  # of those in flight, the ones back on the queue then
    left_behind: frozenset[str]  # still held by a stopped worker process: only its death would free them

    @property
    def finished_while_stopping(self) -> frozenset[str]:
        return self.unfinished & self.finished

    def summary(self) -> str:
        return (
            f"exit {self.returncode} after {self.exit_s:.1f} s; {len(self.in_flight)} in flight, "
            f"{len(self.finished_while_stopping)} finished while stopping, {len(self.requeued)} requeued, "
            f"{len(self.left_behind)} left behind"
        )


def booted(log: Path) -> bool:
    return log.exists() and log.read_text(errors="replace").count(READY_LINE) >= PROCESSES


def stop_once(
    chains: Chains, client: redis.Redis, server: EmbeddingServer, rng: random.Random, log: Path
) -> Stop:
    """Start the worker, and once it embeds, SIGTERM its whole group twice; what the stop did."""
    known = set(broker_view(client).fetched)
    with running_worker(WORKER_ENV, log) as worker:
        drive(chains.step, lambda: booted(log), 60, "both worker processes to boot")
        seen = len(server.embedding_requests)
        drive(chains.step, lambda: len(server.embedding_requests) > seen, 60, "the worker to embed")
        time.sleep(rng.uniform(*STOP_AFTER_S))
        view, sent_by_id = broker_view(client), chains.by_id()
        in_flight = view.fetched_by(set(view.fetched) - known) & set(sent_by_id)
        unfinished = frozenset(message_id for message_id in in_flight if not settle(sent_by_id[message_id]))
        signal_group(worker, signal.SIGTERM)
        stopped_at = time.monotonic()
        time.sleep(rng.uniform(*SECOND_SIGTERM_AFTER_S))
        signal_group(worker, signal.SIGTERM)
        drive(chains.step, lambda: not group_members(worker.pid), SHUTDOWN_TIMEOUT_MS / 1000 + 10, "the exit")
        exit_s, returncode = time.monotonic() - stopped_at, worker.wait(timeout=5)
    after = broker_view(client)
    finished = frozenset(message_id for message_id in in_flight if settle(sent_by_id[message_id]))
    return Stop(
        returncode,
        exit_s,
        in_flight,
        unfinished,
        finished,
        requeued=in_flight & after.queued,
        left_behind=after.fetched_by(set(after.fetched) - known) & set(chains.by_id()),
    )


def check_stops(stops: list[Stop]) -> None:
    """Each stop: a clean exit in time, every fetched message finished or requeued, one mid-task."""
    for stop in stops:
        assert not stop.left_behind, f"dropped mid-task, left for the dead-worker timeout: {stop}"
        assert stop.in_flight == stop.finished | stop.requeued, f"neither finished nor requeued: {stop}"
        assert stop.finished_while_stopping, (
            f"no message was running at the SIGTERM, or none finished: {stop}"
        )
        assert (stop.returncode, stop.exit_s < SHUTDOWN_TIMEOUT_MS / 1000) == (0, True), stop


@pytest.mark.timeout(300)
def test_a_double_sigterm_mid_task_finishes_or_requeues_every_message_and_loses_none(
    embedding_service: EmbeddingServer,
    redis_client: redis.Redis,
    namespace: str,
    worker_logs: Path,
    reliability_report: Report,
) -> None:
    rng = random.Random(SEED)
    embedding_service.latency_ms = EMBEDDING_LATENCY_MS
    model = Model(namespace)
    chains = Chains(model, mixed_chains(rng, KEYS))
    started = time.monotonic()

    stops = []
    for number in range(STOPS):
        stop = stop_once(chains, redis_client, embedding_service, rng, worker_logs / f"stopped-{number}.log")
        print(f"stop {number + 1}: {stop.summary()}")
        stops.append(stop)
    embedding_service.latency_ms = 0
    with running_worker(None, worker_logs / "last.log"):
        drive(chains.step, lambda: chains.done, 120, "every chain to finish")
    elapsed_s = time.monotonic() - started

    check_stops(stops)
    assert not broker_view(redis_client).held & {sent.message_id for sent in chains.sent}
    check_results(chains.sent, ("applied",))
    runtime = state.runtime()
    checked = check_invariants(runtime.memories, runtime.dead_letters, model.expectation())
    check_dead_letter_errors(runtime.dead_letters, model.dead)

    finished = sum(len(stop.finished_while_stopping) for stop in stops)
    requeued = sum(len(stop.requeued) for stop in stops)
    reliability_report(
        "2. double SIGTERM to every process, mid-task",
        f"{len(chains.sent)} messages ({KEYS} keys), {STOPS} stops of {PROCESSES} processes x 2 threads, "
        f"{elapsed_s:.0f} s",
        f"each stop: exit 0 within {max(stop.exit_s for stop in stops):.1f} s, {finished} running messages "
        f"finished while stopping, {requeued} prefetched requeued, none left behind; {checked['keys']} keys, "
        f"{checked['dead_letters']} dead letters; every message applied once",
    )
