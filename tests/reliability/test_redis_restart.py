"""Scenario 4: the Redis server restarts mid-load under the Procfile worker.

The test runs a Redis of its own (AOF, appendfsync everysec), a worker on it, and an app-side broker
on it in this process. Once a third of the syncs are acknowledged (their results returned), Redis is
stopped with SIGTERM, kept down for a few seconds and started again on the same port and directory.
Every acknowledged sync must still be there, the worker must reconnect, the rest must converge.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import ResultBackend, ResultMissing, Results

import actors
from actors import state
from actors.brokers import build_broker
from actors.deadletter import DeadLetters
from actors.runtime import make_embedder
from kvstore import BrokerKeys, Keys, MemoryStore, Record
from tests.reliability.conftest import Report
from tests.reliability.invariants import Expectation, check_invariants
from tests.support.embedding_server import EmbeddingServer
from tests.support.services import Service, start_redis
from tests.support.worker import running_worker, wait_until
from vectorstore import Memories, VectorIndex, chroma_client

#: Redis keeps an append-only file, fsynced every second (and on a SIGTERM shutdown).
APPENDONLY: Final = True
SYNCS: Final = 300
UPDATES: Final = 50
#: Longer than redis-py's own retries (10, backoff capped at 1 s) usually cover, so errors surface.
REDIS_DOWN_S: Final = 4.0
EMBEDDING_LATENCY_MS: Final = 40
#: 20 retries, backoff 50 ms doubling to 1 s: ~17 s of backoff for a sync that meets the outage.
WORKER_ENV: Final = {"MEMSYNC_THREADS": "4", "MEMSYNC_MAX_RETRIES": "20", "MEMSYNC_MAX_BACKOFF_MS": "1000"}
CONVERGE_TIMEOUT_S: Final = 60.0


@dataclass
class OwnRedis:
    """A redis-server of this test's own, restartable on the same port and directory."""

    directory: Path
    service: Service

    @property
    def url(self) -> str:
        return self.service.url

    def restart(self, down_s: float) -> float:
        """Stop with SIGTERM (Redis fsyncs the AOF), stay down `down_s`, start again; seconds it was down."""
        port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        stopped_at = time.monotonic()
        self.service.stop()
        time.sleep(down_s)
        self.service = start_redis(self.directory, port, appendonly=APPENDONLY)
        return time.monotonic() - stopped_at


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    own = OwnRedis(tmp_path / "redis", start_redis(tmp_path / "redis", appendonly=APPENDONLY))
    yield own
    own.service.stop()


@dataclass
class App:
    """The app's side: a broker bound to the test's Redis, and the results it has seen."""

    broker: RedisBroker
    backend: ResultBackend
    sent: dict[str, dramatiq.Message[Any]] = field(default_factory=dict)
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)

    def sync(self, namespace: str, key: str, value: str) -> None:
        message = actors.memory_sync.message(key=key, value=value, embed=True, namespace=namespace)
        self.sent[message.message_id] = self.broker.enqueue(message)

    def poll(self) -> int:
        """Collect the results returned since the last poll; Redis being down is no error here."""
        with contextlib.suppress(redis.RedisError):
            for message_id, message in self.sent.items():
                if message_id not in self.acked:
                    with contextlib.suppress(ResultMissing):
                        self.acked[message_id] = message.get_result(backend=self.backend)
        return len(self.acked)

    def key_of(self, message_id: str) -> str:
        return str(self.sent[message_id].kwargs["key"])


def app_on(url: str) -> App:
    broker = build_broker(state.settings(), url)
    assert isinstance(broker, RedisBroker), "this scenario restarts the Redis broker"
    broker.declare_queue(state.settings().queue)
    backend = next(m.backend for m in broker.middleware if isinstance(m, Results))
    return App(broker, backend)


def poll_until(app: App, count: int, what: str) -> None:
    try:
        wait_until(lambda: app.poll() >= count, CONVERGE_TIMEOUT_S, what, interval_s=0.1)
    except AssertionError as timeout:
        waiting = sorted(app.key_of(i) for i in set(app.sent) - set(app.acked))
        raise AssertionError(f"{timeout}: {len(waiting)} without a result, {waiting[:10]}") from None


def memories_on(client: redis.Redis, chroma_url: str) -> Memories:
    """The worker's Memories as it builds them (actors/runtime.py), on this test's Redis."""
    s = state.settings()
    embedder = make_embedder(s)
    store = MemoryStore(client, prefix=s.prefix, history_length=s.history_length)
    index = VectorIndex(
        chroma_client(chroma_url), model=embedder.model, dimensions=embedder.dimensions, prefix=s.prefix
    )
    return Memories(store, index, embedder)


def lost(app: App, memories: Memories, namespace: str, message_ids: set[str]) -> list[str]:
    """The acknowledged syncs of which Redis holds neither the write nor a later one of the same key."""
    keys = {message_id: app.key_of(message_id) for message_id in message_ids}
    records = memories.store.records(sorted(set(keys.values())), namespace=namespace)
    return sorted(i for i in message_ids if not _holds(records.get(keys[i]), app.sent[i]))


def _holds(record: Record | None, message: dramatiq.Message[Any]) -> bool:
    """Whether `record` is the write of `message`, or of a message sent after it."""
    if record is None:
        return False
    return (record.msg_ts, record.msg_id) >= (message.message_timestamp, message.message_id)


def text_of(n: int, round_: int) -> str:
    return f"memory number {n} from round {round_}, about subject {n % 17}"


def send_round(app: App, expected: Expectation, numbers: list[int], round_: int) -> None:
    for n in numbers:
        app.sync(expected.namespace, f"fact-{n}", text_of(n, round_))
        expected.sync(f"fact-{n}", text_of(n, round_))


def applied_numbers(app: App, message_ids: set[str]) -> list[int]:
    """The numbers of the keys these (acknowledged, so applied) syncs wrote."""
    return sorted(int(app.key_of(message_id).removeprefix("fact-")) for message_id in message_ids)


def connection_errors(log: Path) -> int:
    return log.read_text(errors="replace").count("connection error")


def worker_ids(app: App) -> list[str]:
    """The broker ids of the worker processes: every id with a heartbeat but the app's own."""
    beats = app.broker.client.zrange(BrokerKeys(app.broker.namespace).heartbeats(), 0, -1)
    ids = [beat.decode() for beat in beats if isinstance(beat, bytes)]
    return [broker_id for broker_id in ids if broker_id != app.broker.broker_id]


def worker_env(own_redis: OwnRedis) -> dict[str, str]:
    return {**WORKER_ENV, "REDIS_URL": own_redis.url}


def restarted_mid_load(
    app: App, expected: Expectation, own_redis: OwnRedis, memories: Memories, log: Path
) -> tuple[set[str], float]:
    """Sync, restart Redis once a third is acknowledged, then update some keys; wait for every result.

    Returns the syncs acknowledged before the restart and how long Redis was down. A fetch whose
    reply the restart lost comes back too: the worker takes a new id when its consumer reconnects.
    """
    with running_worker(worker_env(own_redis), log):
        send_round(app, expected, list(range(SYNCS)), 1)
        poll_until(app, SYNCS // 3, "a third of the syncs to be acknowledged")
        acked_before = set(app.acked)
        down_s = own_redis.restart(REDIS_DOWN_S)
        missing = lost(app, memories, expected.namespace, acked_before)
        assert not missing, f"{len(missing)} of {len(acked_before)} acknowledged syncs lost: {missing[:5]}"
        send_round(app, expected, applied_numbers(app, acked_before)[:UPDATES], 2)
        poll_until(app, len(app.sent), "every sync to be acknowledged after the restart")
        return acked_before, down_s


@pytest.mark.timeout(150)
def test_no_acknowledged_sync_is_lost_when_redis_restarts_mid_load(
    embedding_service: EmbeddingServer,
    own_redis: OwnRedis,
    chroma_url: str,
    namespace: str,
    worker_logs: Path,
    reliability_report: Report,
) -> None:
    embedding_service.latency_ms = EMBEDDING_LATENCY_MS
    app, expected = app_on(own_redis.url), Expectation(namespace)
    client = redis.Redis.from_url(own_redis.url)
    memories = memories_on(client, chroma_url)
    started = time.monotonic()
    acked_before, down_s = restarted_mid_load(app, expected, own_redis, memories, worker_logs / "worker.log")
    took_s = time.monotonic() - started

    assert not lost(app, memories, namespace, set(app.acked) - acked_before), "lost after the restart"
    assert [r["status"] for r in app.acked.values()] == ["success"] * len(app.sent)
    errors = connection_errors(worker_logs / "worker.log")
    print(f"{len(acked_before)} acked before the restart, {errors} connection errors")
    checked = check_invariants(memories, DeadLetters(client, Keys(state.settings().prefix)), expected)
    reliability_report(
        "4. Redis restart mid-load",
        f"{SYNCS} syncs, then {UPDATES} updates after the restart; Redis (AOF, appendfsync everysec) "
        f"stopped by SIGTERM after {len(acked_before)} acks, down {down_s:.1f} s, started again on the same "
        f"port and directory; 1 worker process x 4 threads, MEMSYNC_MAX_RETRIES=20, backoff 50-1000 ms; "
        f"{took_s:.0f} s",
        f"all {len(acked_before)} syncs acknowledged before the restart still in Redis right after it; "
        f"the worker reconnected ({errors} connection errors logged) and every sync converged, with its "
        f"result; invariants {checked}",
    )


def stranded_fetch(app: App, worker_id: str, namespace: str) -> dramatiq.Message[Any]:
    """A sync moved into `worker_id`'s unacknowledged set without the worker receiving it.

    That is what Redis does when it runs a worker's fetch (dispatch.lua) and stops before sending the
    reply: the script's effect is in the AOF, the reply is lost, and the worker never sees the message.
    """
    queue, redis_id = state.settings().queue, str(uuid.uuid4())
    message = actors.memory_sync.message(
        key="stranded", value="fetched as Redis stopped", embed=True, namespace=namespace
    )
    message = message.copy(options={"redis_message_id": redis_id})
    client, keys = app.broker.client, BrokerKeys(app.broker.namespace)
    client.hset(keys.queue_messages(queue), redis_id, message.encode())
    client.sadd(keys.acks(worker_id, queue), redis_id)
    return message


@pytest.mark.timeout(60)
def test_a_sync_fetched_as_redis_stopped_is_delivered_again_while_its_worker_lives(
    embedding_service: EmbeddingServer, own_redis: OwnRedis, namespace: str, worker_logs: Path
) -> None:
    app = app_on(own_redis.url)
    fast_heartbeat = {**worker_env(own_redis), "MEMSYNC_HEARTBEAT_TIMEOUT_MS": "2000"}
    with running_worker(fast_heartbeat, worker_logs / "worker.log"):
        (worker_id,) = wait_until(lambda: worker_ids(app), 30, "the worker's first heartbeat")
        message = stranded_fetch(app, worker_id, namespace)
        own_redis.restart(down_s=0.5)
        # The worker takes a new id after the restart; its old id's messages are back after the timeout.
        result = message.get_result(backend=app.backend, block=True, timeout=20_000)
    assert result["status"] == "success"
