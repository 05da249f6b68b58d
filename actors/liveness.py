"""Which worker processes are alive: each beats in the store's Redis, whatever the broker.

Dramatiq's Redis broker keeps heartbeats of its own, for its requeue, and only on its own Redis;
RabbitMQ keeps none that a client can read (it hands a dropped connection's messages back at once).
`WorkerHeartbeat` gives `memsync` commands one answer with either broker: a worker process is
alive while its entry in `{prefix}:workers` is younger than the heartbeat timeout.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

import dramatiq
import redis
from dramatiq.middleware import Middleware

__all__ = ["FORGET_AFTER_MS", "WorkerHeartbeat", "live_workers", "redis_now_ms"]

#: Entries older than this are removed at each beat: a killed worker's entry lingers no longer.
FORGET_AFTER_MS = 3_600_000

logger = logging.getLogger("memsync.worker")


class WorkerHeartbeat(Middleware):
    """Beats for this worker process every `interval_ms` on a thread of its own; a clean stop removes it.

    The first beat is at boot, so a worker counts as alive as soon as it consumes. The entry's id
    names the host and process (`host:pid:random`), never a message or a user's data.
    """

    def __init__(self, client: redis.Redis, key: str, interval_ms: int) -> None:
        self.client = client
        self.key = key
        self.interval_s = interval_ms / 1000
        # Each worker of this process beats under an id of its own (a process runs one; tests, several).
        self._beating: dict[dramatiq.Worker, tuple[str, threading.Event]] = {}
        self._failing = False

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        worker_id, stop = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", threading.Event()
        self._beating[worker] = (worker_id, stop)
        self._beat(worker_id)
        threading.Thread(target=self._run, args=(worker_id, stop), daemon=True, name="memsync-beat").start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if worker not in self._beating:
            return
        worker_id, stop = self._beating.pop(worker)
        stop.set()
        try:
            self.client.zrem(self.key, worker_id)
        except redis.RedisError:
            logger.warning("could not remove this worker's heartbeat; Redis unreachable")

    def _run(self, worker_id: str, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            self._beat(worker_id)

    def _beat(self, worker_id: str) -> None:
        try:
            now_ms = redis_now_ms(self.client)
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(self.key, {worker_id: now_ms})
            pipe.zremrangebyscore(self.key, "-inf", now_ms - FORGET_AFTER_MS)
            pipe.execute()
        except redis.RedisError:
            if not self._failing:  # once an outage, not at every beat
                logger.warning("worker heartbeat failed; Redis unreachable (said once until it is back)")
            self._failing = True
            return
        if self._failing:
            logger.info("worker heartbeat back: Redis answers again")
        self._failing = False


def live_workers(client: redis.Redis, key: str, timeout_ms: int) -> list[str]:
    """The ids of the worker processes that have beaten within the last `timeout_ms`."""
    since_ms = redis_now_ms(client) - timeout_ms
    return [_text(member) for member in client.zrangebyscore(key, since_ms, "+inf")]


def redis_now_ms(client: redis.Redis) -> int:
    """Redis's clock, which every worker and command shares, whatever the machines' own clocks say."""
    seconds, microseconds = client.time()
    return int(seconds) * 1000 + int(microseconds) // 1000


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
