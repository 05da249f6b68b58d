"""Scenario 1, kill -9: the worker is SIGKILLed at random moments while it works, and restarted.

Syncs with embeddings and rollbacks run in chains per key (the next op once the previous has a
result, so the end state is known exactly). The Procfile worker is killed at least ten times, each
time at a random moment after it starts embedding, and started again. Every message the killed
worker had fetched and not acknowledged must be back on the queue within 30 s of the kill, and be
done (its result stored) within 30 s of the last kill that hit it; the end state must pass every
invariant.

On RabbitMQ (`BROKER_URL=amqp://...`, see tests/actors/test_rabbitmq.py) the broker cannot say which
messages a consumer holds, only how many are ready and how many consumers there are: a kill lands
while more of this run's messages are unfinished than ready (so the worker holds some), and every
message without a result at the kill must be ready again once RabbitMQ has dropped the dead
worker's consumers.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

import actors
from actors import state
from kvstore import Keys
from tests.reliability.conftest import Report
from tests.reliability.invariants import Expectation, check_invariants
from tests.reliability.workload import (
    BrokerView,
    Chains,
    Model,
    Sent,
    broker_view,
    check_dead_letter_errors,
    check_results,
    drive,
    mixed_chains,
    send,
    settle,
    sync,
)
from tests.support.brokers import RabbitQueues, on_rabbitmq
from tests.support.embedding_server import EmbeddingServer
from tests.support.worker import running_worker, signal_group, wait_until

SEED = 1_000_003
#: On RabbitMQ, a dead worker's messages are back at once: fewer kills show it, in less of the suite's time.
KILLS = 8 if on_rabbitmq() else 15
KEYS = 24
#: Long enough that every kill lands on messages in flight, short enough for a quick run.
EMBEDDING_LATENCY_MS = 100
#: A kill comes this long (drawn at random) after the new worker's first embedding request.
KILL_AFTER_S = (0.0, 0.8)
REDELIVERY_DEADLINE_S = 30.0


@dataclass
class Kill:
    """One SIGKILL: when, and the messages the killed worker had fetched and not acknowledged."""

    at: float
    in_flight: frozenset[str]
    #: message id -> seconds until the message was out of the dead worker's hands: back on the queue
    #: (the maintenance pass that finds the worker's heartbeat too old), or fetched again, or done
    requeued_after_s: dict[str, float] = field(default_factory=dict)

    @property
    def waiting(self) -> frozenset[str]:
        return self.in_flight - set(self.requeued_after_s)


class Kills:
    """Which messages each kill left unacknowledged, and when each was requeued and done.

    What the broker can tell differs: `RedisKills` and `RabbitmqKills` read it.
    """

    def __init__(self, chains: Chains) -> None:
        self.chains = chains
        self.kills: list[Kill] = []

    def step(self) -> None:
        """Move the chains on (and note what the broker has put back since the last kill)."""
        self.chains.step()

    def killed(self, at: float) -> Kill:
        """Record a kill once the worker is gone."""
        raise NotImplementedError

    def working(self) -> bool:
        """Whether a live worker holds messages of this run (fetched, not acknowledged)."""
        raise NotImplementedError

    def unfinished(self) -> str:
        """Where the messages still without a result are, for a failure message."""
        raise NotImplementedError

    def nothing_held(self) -> bool:
        """Whether the broker holds no message of this run any more (call with no worker running)."""
        raise NotImplementedError

    @property
    def settled(self) -> bool:
        return not any(kill.waiting for kill in self.kills)

    def requeue_times(self) -> list[float]:
        return [seconds for kill in self.kills for seconds in kill.requeued_after_s.values()]

    def done_times(self) -> list[float]:
        """For each killed message, the seconds from the last kill that hit it to its result."""
        last_kill = {message_id: kill.at for kill in self.kills for message_id in kill.in_flight}
        done = {sent.message_id: sent.done_at for sent in self.chains.sent if sent.done_at is not None}
        return [done[message_id] - at for message_id, at in last_kill.items()]

    def drive(self, until: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Step until `until()` holds; a timeout says where the unfinished messages are."""
        try:
            drive(self.step, until, timeout_s, what)
        except AssertionError as error:
            raise AssertionError(f"{error}; unfinished: {self.unfinished()}") from None

    def mine(self) -> set[str]:
        """The ids of the messages this run has sent."""
        return {sent.message_id for sent in self.chains.sent}


class RedisKills(Kills):
    """On Dramatiq's Redis broker, which names the messages each worker (broker id) fetched."""

    def __init__(self, client: redis.Redis, chains: Chains) -> None:
        super().__init__(chains)
        self.client = client
        self.dead_workers = set(broker_view(client).fetched)  # and those of earlier tests

    def step(self) -> None:
        """Move the chains on, and note which killed messages are out of the dead workers' hands."""
        self.chains.step()
        if any(kill.waiting for kill in self.kills):
            self._note_requeued(broker_view(self.client), time.monotonic())

    def killed(self, at: float) -> Kill:
        """Record a kill once the worker is gone: its messages are those only its broker ids fetched."""
        view = broker_view(self.client)
        self._note_requeued(view, at)
        dead = set(view.fetched) - self.dead_workers
        kill = Kill(at, view.fetched_by(dead) & self.mine())
        self.dead_workers |= dead
        self.kills.append(kill)
        return kill

    def working(self) -> bool:
        view = broker_view(self.client)
        return bool(view.fetched_by(set(view.fetched) - self.dead_workers) & self.mine())

    def _note_requeued(self, view: BrokerView, now: float) -> None:
        back = self.mine() - view.fetched_by(self.dead_workers)
        for kill in self.kills:
            for message_id in kill.waiting & back:
                kill.requeued_after_s[message_id] = now - kill.at

    def unfinished(self) -> str:
        view, by_id = broker_view(self.client), self.chains.by_id()
        return "; ".join(
            f"{by_id[message_id].op} {message_id}: {self._place(view, message_id)}"
            for message_id in (sent.message_id for sent in self.chains.running.values())
        )

    def _place(self, view: BrokerView, message_id: str) -> str:
        if message_id in view.fetched_by(self.dead_workers):
            return "fetched by a dead worker"
        if message_id in view.fetched_by(view.fetched):
            return "fetched by a live worker"
        return "queued" if message_id in view.held else "no longer held by the broker"

    def nothing_held(self) -> bool:
        return not broker_view(self.client).held & self.mine()


class RabbitmqKills(Kills):
    """On RabbitMQ, which tells a client only how many messages are ready and how many consumers wait.

    The queue is this run's alone (flushed at the start), so every ready message is this run's. A
    kill's `in_flight` is every message without a result at the kill, the ones the worker held among
    them (`held` counts at least those). They are back once RabbitMQ has dropped the dead worker's
    consumers and at least as many messages are ready as have no result.
    """

    def __init__(self, chains: Chains, queues: RabbitQueues) -> None:
        super().__init__(chains)
        self.queues = queues
        self.held: list[int] = []
        self._held_now = 0

    def working(self) -> bool:
        # Counted before the results are read: a message done in between is never taken for held.
        sent = list(self.chains.sent)
        ready, consumers = self.queues.counts()
        self._held_now = len(_without_result(sent)) - ready
        return consumers > 0 and self._held_now > 0

    def killed(self, at: float) -> Kill:
        unfinished = _without_result(self.chains.sent)  # the worker is gone: no result comes now
        wait_until(
            lambda: self.queues.ready_once_unconsumed() >= len(unfinished),
            REDELIVERY_DEADLINE_S,
            "RabbitMQ to put back every message without a result",
            interval_s=0.005,
        )
        kill = Kill(at, unfinished, dict.fromkeys(unfinished, time.monotonic() - at))
        self.kills.append(kill)
        self.held.append(self._held_now)
        return kill

    def unfinished(self) -> str:
        ready, consumers = self.queues.counts()
        running = sorted(sent.message_id for sent in self.chains.running.values())
        return f"{running} have no result; {ready} messages ready, {consumers} consumers"

    def nothing_held(self) -> bool:
        return self.queues.ready_once_unconsumed() == 0


def _without_result(sent: Iterable[Sent]) -> frozenset[str]:
    return frozenset(one.message_id for one in sent if not settle(one))


def kill_once(kills: Kills, server: EmbeddingServer, rng: random.Random, log: Path) -> Kill:
    """Start a worker, let it take work, SIGKILL its whole group at a random moment; the kill.

    The moment is drawn after its first embedding request; if the worker holds no message then
    (all are done, or held by killed workers until they are delivered again), the kill waits for one.
    """
    with running_worker(None, log) as worker:
        seen = len(server.embedding_requests)
        kills.drive(lambda: len(server.embedding_requests) > seen, 60, "the new worker to embed")
        pause = time.monotonic() + rng.uniform(*KILL_AFTER_S)
        kills.drive(lambda: time.monotonic() >= pause and kills.working(), 60, "work to kill")
        signal_group(worker, signal.SIGKILL)
        killed_at = time.monotonic()
    return kills.killed(killed_at)


def check_timings(kills: Kills) -> tuple[list[float], list[float]]:
    """KILLS kills hit work; their messages were requeued, and done, within 30 s; returns both timings."""
    requeued, done = kills.requeue_times(), kills.done_times()
    in_flight = sum(len(kill.in_flight) for kill in kills.kills)
    print(f"{len(kills.mine())} messages, {in_flight} killed in flight; seconds from the kill until")
    print(f"  requeued: {[round(seconds, 1) for seconds in sorted(requeued)]}")
    print(f"  done, after the last kill that hit it: {[round(seconds, 1) for seconds in sorted(done)]}")
    landed = sum(bool(kill.in_flight) for kill in kills.kills)
    assert landed == KILLS, f"only {landed} of {len(kills.kills)} kills landed on work in flight"
    assert max(requeued) < REDELIVERY_DEADLINE_S, f"killed work requeued after {max(requeued):.1f} s"
    assert max(done) < REDELIVERY_DEADLINE_S, f"killed work done again after {max(done):.1f} s"
    return requeued, done


def in_flight_text(kills: Kills) -> str:
    in_flight = sum(len(kill.in_flight) for kill in kills.kills)
    if isinstance(kills, RabbitmqKills):
        return (
            f"{in_flight} without a result at the kills ({sum(kills.held)} or more held by the killed worker)"
        )
    return f"{in_flight} killed in flight"


@pytest.fixture
def rabbit_queues() -> Iterator[RabbitQueues | None]:
    """On RabbitMQ, a view of this run's queue, emptied first; on Dramatiq's Redis broker, None."""
    if not on_rabbitmq():
        yield None
        return
    state.broker().flush_all()
    queues = RabbitQueues(state.settings().queue)
    yield queues
    queues.close()


@pytest.mark.timeout(300)
def test_a_worker_killed_at_random_moments_loses_nothing_and_applies_nothing_twice(
    embedding_service: EmbeddingServer,
    redis_client: redis.Redis,
    rabbit_queues: RabbitQueues | None,
    namespace: str,
    worker_logs: Path,
    reliability_report: Report,
) -> None:
    rng = random.Random(SEED)
    embedding_service.latency_ms = EMBEDDING_LATENCY_MS
    model = Model(namespace)
    chains = Chains(model, mixed_chains(rng, KEYS, parts=2))
    kills: Kills = (
        RedisKills(redis_client, chains) if rabbit_queues is None else RabbitmqKills(chains, rabbit_queues)
    )
    started = time.monotonic()

    # A kill can land just after the worker acknowledged its last message: it then hit nothing, and
    # another one is made, so that KILLS kills land on work in flight (at most KILLS more tries).
    for number in range(2 * KILLS):
        kill = kill_once(kills, embedding_service, rng, worker_logs / f"killed-{number:02d}.log")
        print(f"kill {number + 1}: {len(kill.in_flight)} messages in flight")
        if sum(bool(kill.in_flight) for kill in kills.kills) == KILLS:
            break
    with running_worker(None, worker_logs / "last.log"):
        kills.drive(lambda: chains.done and kills.settled, 120, "every chain and killed message")
    elapsed_s = time.monotonic() - started

    requeued, done = check_timings(kills)
    assert kills.nothing_held(), "a message is still held by the broker"
    check_results(chains.sent, ("applied", "duplicate"))
    runtime = state.runtime()
    checked = check_invariants(runtime.memories, runtime.dead_letters, model.expectation())
    check_dead_letter_errors(runtime.dead_letters, model.dead)

    duplicates = sum(sent.outcome == "duplicate" for sent in chains.sent)
    reliability_report(
        f"1. kill -9 at random moments{' (RabbitMQ)' if rabbit_queues else ''}",
        f"{len(chains.sent)} messages ({KEYS} keys: syncs with and without embeddings, long texts "
        "in chunks, metadata changes, rollbacks), "
        f"{KILLS} kills, {in_flight_text(kills)}, {elapsed_s:.0f} s",
        f"killed work requeued within {max(requeued):.1f} s and done within {max(done):.1f} s "
        f"(< 30 s); {duplicates} redelivered after their write, applied once; {checked['keys']} keys, "
        f"{checked['vectors']} vectors ({checked['chunked']} keys in several chunks), "
        f"{checked['dead_letters']} dead letters with their reasons",
    )


@pytest.mark.timeout(120)
def test_a_worker_killed_inside_the_index_step_has_its_message_done_again_within_30_seconds(
    embedding_service: EmbeddingServer, redis_client: redis.Redis, namespace: str, worker_logs: Path
) -> None:
    lock = Keys(state.settings().prefix).lock(namespace, "locked")
    sent = send(sync("locked", "a memory whose worker dies in the index step"), namespace)
    with running_worker(None, worker_logs / "killed.log") as worker:
        wait_until(
            lambda: redis_client.exists(lock), 60, "the worker to lock the key's index", interval_s=0.001
        )
        signal_group(worker, signal.SIGKILL)
        killed_at = time.monotonic()
    lock_left_s = int(redis_client.pttl(lock)) / 1000
    assert lock_left_s > 0, "the kill must land while the worker holds the key's index lock"

    with running_worker(None, worker_logs / "fresh.log"):
        drive(lambda: None, lambda: settle(sent), 90, "the killed message to be done again")
    assert sent.done_at is not None
    back_s = sent.done_at - killed_at

    print(f"done again {back_s:.1f} s after the kill; the dead worker's lock had {lock_left_s:.1f} s left")
    assert (sent.outcome, sent.result and sent.result["version"]) == ("duplicate", 1)
    assert back_s < REDELIVERY_DEADLINE_S, (
        f"done again {back_s:.1f} s after the kill: the key's index lock, left by the killed worker, "
        f"kept the key locked for {lock_left_s:.1f} s more"
    )


BATCHES = 12
BATCH_ITEMS = 25
BATCH_KILLS = 4


@pytest.mark.timeout(300)
def test_a_worker_killed_in_the_middle_of_batches_applies_every_item_once(
    embedding_service: EmbeddingServer,
    redis_client: redis.Redis,
    namespace: str,
    worker_logs: Path,
    reliability_report: Report,
) -> None:
    """Batch messages of embedded items, the worker killed at random moments: each item ends at v1."""
    rng = random.Random(SEED + 1)
    embedding_service.latency_ms = EMBEDDING_LATENCY_MS
    expected = Expectation(namespace)
    messages = []
    for batch in range(BATCHES):
        items: list[dict[str, Any]] = [
            {
                "key": f"b{batch}-{n}",
                "value": f"batch {batch} memory {n}",
                "embed": n % 5 != 0,
                "namespace": namespace,
            }
            for n in range(BATCH_ITEMS)
        ]
        for item in items:
            expected.sync(item["key"], item["value"], embed=item["embed"])
        messages.append(actors.memory_sync_batch.send(items=items))
    for number in range(BATCH_KILLS):
        with running_worker(None, worker_logs / f"killed-{number}.log") as worker:
            seen = len(embedding_service.embedding_requests)
            wait_until(lambda: len(embedding_service.embedding_requests) > seen, 60, "the worker to embed")  # noqa: B023
            time.sleep(rng.uniform(*KILL_AFTER_S))
            signal_group(worker, signal.SIGKILL)
    with running_worker(None, worker_logs / "last.log"):
        results = [message.get_result(block=True, timeout=120_000) for message in messages]

    outcomes = Counter(item["outcome"] for result in results for item in result["results"])
    assert set(outcomes) <= {"applied", "duplicate"}, outcomes
    assert sum(outcomes.values()) == BATCHES * BATCH_ITEMS
    runtime = state.runtime()
    checked = check_invariants(runtime.memories, runtime.dead_letters, expected)
    versions = {runtime.store.record(key, namespace=namespace).version for key in expected.keys}  # type: ignore[union-attr]
    assert versions == {1}, "an item was applied twice"
    reliability_report(
        f"1b. kill -9 in the middle of batches{' (RabbitMQ)' if on_rabbitmq() else ''}",
        f"{BATCHES} batch messages of {BATCH_ITEMS} items (4 in 5 embedded), {BATCH_KILLS} kills at random "
        "moments after the worker's first embedding request",
        f"every item applied once (all at version 1; {outcomes['duplicate']} reported as duplicates after "
        f"a redelivery); invariants {checked}",
    )
