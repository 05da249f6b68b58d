"""Scenario 6, concurrency: many sender threads, two worker processes, syncs and rollbacks on a few keys.

Messages to one key are in flight together, so which one a worker applies first is up to the
race; what must hold is last-writer-wins by send time. For each key: its versions are written by
exactly the messages whose result says `applied`, each once, in send order (timestamp, then id);
the key ends with its newest message's write; a `stale` message is older than the version it
deferred to; every version holds what its message makes of the version before (a rollback, the
version before that); and after every round, once each message has its result, the index matches
Redis. The messages go in rounds, each a burst from every sender thread at once; the workers keep
the whole history, so every version can be checked.
"""

from __future__ import annotations

import itertools
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import actors  # noqa: F401  (builds the broker the messages go through)
from actors import state
from kvstore import MemoryStore, Record, WriteMeta
from tests.reliability.conftest import Report
from tests.reliability.invariants import Expectation, KeyState, check_invariants
from tests.reliability.workload import (
    KeyModel,
    Op,
    Sent,
    check_dead_letter_errors,
    invalid,
    rollback,
    send,
    settle,
    stored_versions,
    sync,
)
from tests.support.embedding_server import EmbeddingServer
from tests.support.worker import READY_LINE, running_worker, wait_until
from vectorstore import Memories
from vectorstore.reconcile import find_drift

SEED = 6_000_003
KEYS = [f"key-{i}" for i in range(4)]
SENDERS = 8
ROUNDS = 40
PER_SENDER_AND_ROUND = 2
HISTORY_LENGTH = 1000  # every version stays, so every version can be checked
WORKER_ENV = {"MEMSYNC_PROCESSES": "1", "MEMSYNC_THREADS": "4", "MEMSYNC_HISTORY_LENGTH": str(HISTORY_LENGTH)}
#: Long enough for embeddings to overlap with other messages' writes to the same key.
EMBEDDING_LATENCY_MS = 20
WORDS = ("tea", "coffee", "chess", "jazz", "rain", "cats")


def random_op(rng: random.Random, key: str) -> Op:
    """Mostly embedded syncs (words repeat, so some need no embedding call), plain syncs, rollbacks."""
    roll = rng.random()
    if roll < 0.55:
        return sync(key, f"{key} likes {rng.choice(WORDS)}")
    if roll < 0.70:
        return sync(key, {"plain": rng.choice(WORDS)}, embed=False)
    if roll < 0.95:
        return rollback(key)
    return rollback(key, version=1)


def burst(namespace: str, seed: int) -> list[Sent]:
    """What one sender thread sends in a round: a few random ops on random keys, at once."""
    rng = random.Random(seed)
    return [send(random_op(rng, rng.choice(KEYS)), namespace) for _ in range(PER_SENDER_AND_ROUND)]


def race(pool: ThreadPoolExecutor, namespace: str, round_number: int) -> list[Sent]:
    """One round: every sender thread sends its burst at once; returns the messages once all have results."""
    seeds = [SEED + round_number * SENDERS + n for n in range(SENDERS)]
    sent = [one for batch in pool.map(lambda seed: burst(namespace, seed), seeds) for one in batch]
    for one in sent:
        assert settle(one, timeout_ms=60_000), f"no result for {one}"
    return sent


def sent_in_order(ops: list[Op], namespace: str) -> list[Sent]:
    """Send each op once the one before has a result (two versions per key before the race starts)."""
    sent = []
    for op in ops:
        sent.append(send(op, namespace))
        assert settle(sent[-1], timeout_ms=30_000), f"no result for {op}"
    return sent


def check_last_writer_wins(store: MemoryStore, namespace: str, key: str, messages: list[Sent]) -> KeyState:
    """Check one key's whole history against its messages; returns the state it must end in."""
    versions = stored_versions(store, key, namespace)
    by_id = {sent.message_id: sent for sent in messages}
    writers = [record.msg_id for record in versions]
    applied = sorted(sent.message_id for sent in messages if sent.outcome == "applied")
    assert [record.version for record in versions] == list(range(1, len(versions) + 1)), f"{key}: a gap"
    assert sorted(writers) == applied, f"{key}: versions written by {writers}, results applied {applied}"
    orders = [by_id[writer].order for writer in writers]
    assert all(a < b for a, b in itertools.pairwise(orders)), f"{key}: an older message overwrote a newer one"
    newest = max(messages, key=lambda sent: sent.order)
    assert writers[-1] == newest.message_id, f"{key}: ends with {writers[-1]}, its newest message is {newest}"
    for sent in messages:
        if sent.outcome == "stale":
            assert sent.result is not None
            deferred_to = by_id[versions[int(sent.result["version"]) - 1].msg_id]
            assert sent.order < deferred_to.order, f"{key}: {sent} was not older than {deferred_to}"
    return replayed(key, versions, [by_id[writer].op for writer in writers])


def replayed(key: str, versions: list[Record], ops: list[Op]) -> KeyState:
    """Replay the writers' ops in version order: each stored version must be what its op makes."""
    model = KeyModel(HISTORY_LENGTH)
    for record, op in zip(versions, ops, strict=True):
        assert model.apply(op) is None, f"{key} v{record.version}: {op} should have failed"
        want = model.versions[-1]
        got = (record.version, record.deleted, record.value, record.embed)
        assert got == (want.version, want.deleted, want.value, want.embed and not want.deleted), (
            f"{key} v{record.version}: {got} is not what {op} makes"
        )
    return model.versions[-1]


def all_booted(logs: list[Path]) -> bool:
    return all(log.exists() and READY_LINE in log.read_text(errors="replace") for log in logs)


def race_rounds(namespace: str, memories: Memories) -> tuple[list[Sent], list[str]]:
    """Run every round; returns the messages and the drift found between rounds (there must be none)."""
    racing: list[Sent] = []
    drifts = []
    with ThreadPoolExecutor(SENDERS) as pool:
        for round_number in range(ROUNDS):
            racing += race(pool, namespace, round_number)
            if any((drift := find_drift(memories, namespace)).counts().values()):
                drifts.append(f"after round {round_number + 1}: {drift}")
    return racing, drifts


@pytest.mark.timeout(240)
def test_concurrent_syncs_and_rollbacks_on_a_few_keys_end_with_each_keys_newest_message(
    embedding_service: EmbeddingServer, namespace: str, worker_logs: Path, reliability_report: Report
) -> None:
    embedding_service.latency_ms = EMBEDDING_LATENCY_MS
    runtime = state.runtime()
    logs = [worker_logs / "first.log", worker_logs / "second.log"]
    started = time.monotonic()
    with running_worker(WORKER_ENV, logs[0]), running_worker(WORKER_ENV, logs[1]):
        wait_until(lambda: all_booted(logs), 60, "both worker processes to boot")
        seeded = sent_in_order(
            [sync(key, f"{key} likes {word}") for word in WORDS[:2] for key in KEYS], namespace
        )
        racing, drifts = race_rounds(namespace, runtime.memories)
        refused = sent_in_order([invalid(key) for key in KEYS], namespace)
    elapsed_s = time.monotonic() - started

    assert not drifts, f"the index drifted from Redis once every message had its result: {drifts}"
    assert [sent.failure for sent in refused] == ["InvalidPayload"] * len(refused)
    assert all(sent.result is not None for sent in racing), [sent for sent in racing if sent.result is None]
    expected = Expectation(namespace, dead_message_ids={sent.message_id for sent in refused})
    for key in KEYS:
        of_key = [sent for sent in [*seeded, *racing] if sent.op.key == key]
        expected.keys[key] = check_last_writer_wins(runtime.store, namespace, key, of_key)
    checked = check_invariants(runtime.memories, runtime.dead_letters, expected)
    check_dead_letter_errors(runtime.dead_letters, {sent.message_id: "InvalidPayload" for sent in refused})

    outcomes = {name: sum(sent.outcome == name for sent in racing) for name in ("applied", "stale")}
    print(f"{len(racing)} racing messages: {outcomes}; {elapsed_s:.0f} s")
    reliability_report(
        "6. concurrency: senders and workers racing on a few keys",
        f"{len(seeded) + len(racing) + len(refused)} messages on {len(KEYS)} keys: {ROUNDS} rounds of "
        f"{SENDERS} sender threads at once; 2 worker processes x 4 threads; {elapsed_s:.0f} s",
        f"{outcomes['applied']} applied, {outcomes['stale']} stale; per key every version written once, in "
        f"send order, ending with the newest message, each rollback restoring the version before; no index "
        f"drift after any round; {checked['keys']} keys, {checked['dead_letters']} dead letters",
    )


def plain_sync(memories: Memories, key: str, namespace: str, meta: WriteMeta) -> str:
    return memories.sync(key, {"plain": meta.msg_id}, namespace=namespace, meta=meta).outcome.value


def written_by(memories: Memories, key: str, namespace: str) -> str | None:
    record = memories.store.record(key, namespace=namespace)
    return None if record is None else record.msg_id


def test_a_plain_sync_that_overtakes_another_ones_index_step_leaves_no_vector_behind(namespace: str) -> None:
    """The race the scenario above finds, step by step: three syncs of one key, the last two plain.

    The second has written Redis and waits for the key's lock (held here, as another message's
    index step would); the third, newer, runs meanwhile. Once the lock is free, the first one's
    vector must be gone, whoever removes it.
    """
    memories, key, now_ms = state.runtime().memories, "overtaken", time.time_ns() // 1_000_000
    memories.sync(key, "the user likes tea", embed=True, namespace=namespace, meta=WriteMeta("m1", now_ms))
    with ThreadPoolExecutor(2) as pool:
        with memories.store.key_lock(key, namespace=namespace):
            second = pool.submit(plain_sync, memories, key, namespace, WriteMeta("m2", now_ms + 1))
            wait_until(lambda: written_by(memories, key, namespace) == "m2", 10, "the second write")
            third = pool.submit(plain_sync, memories, key, namespace, WriteMeta("m3", now_ms + 2))
            wait_until(lambda: written_by(memories, key, namespace) == "m3", 10, "the third write")
            time.sleep(0.2)  # the third finishes, or waits for the lock
        assert [second.result(timeout=20), third.result(timeout=20)] == ["applied", "applied"]

    drift = find_drift(memories, namespace)
    assert drift.counts() == {"missing": 0, "stale": 0, "orphan": 0}, (
        f"the first sync's vector is left: {drift}"
    )
