"""Worker process lifecycle: one graceful stop however many SIGTERMs arrive, and a steady heartbeat."""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import dramatiq
import redis
from dramatiq.middleware import Middleware

__all__ = ["GracefulStop", "Heartbeat"]

logger = logging.getLogger("memsync.worker")


class GracefulStop(Middleware):
    """Turns a second SIGTERM into a no-op while the worker is already stopping.

    honcho and Heroku send SIGTERM to every process of a dyno, and Dramatiq's main process passes
    its own on, so each worker process gets two; Dramatiq exits at once on the second, dropping
    the running messages. With this, running messages finish within the shutdown timeout
    (`--worker-shutdown-timeout`); SIGKILL still stops the process at once.
    """

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        first = signal.getsignal(signal.SIGTERM)
        if callable(first):
            signal.signal(signal.SIGTERM, _once(first))


def _once(first: Any) -> Any:
    stopping = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            logger.warning("already stopping: running messages finish first (SIGKILL stops at once)")
            return
        stopping = True
        first(signum, frame)

    return handler


class Heartbeat(Middleware):
    """Beats for the worker every `interval_ms`, even while every thread is busy with a long message.

    Dramatiq's Redis broker only beats when a consumer asks Redis for messages, so a worker whose
    prefetch is full can look dead and have its messages handed to another worker. Beating on a
    thread of its own lets `heartbeat_timeout` be short, which is what makes a killed worker's
    messages come back within seconds rather than minutes.
    """

    def __init__(self, client: redis.Redis, key: str, interval_ms: int) -> None:
        self.client = client
        self.key = key
        self.interval_s = interval_ms / 1000
        self._stop = threading.Event()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if getattr(broker, "broker_id", None) is not None:
            self._stop = threading.Event()
            threading.Thread(target=self._beat, args=(broker, self._stop), daemon=True).start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._stop.set()

    def _beat(self, broker: Any, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            try:  # the id is read at each beat: MemsyncBroker takes a new one when a consumer reconnects
                self.client.zadd(self.key, {str(broker.broker_id): time.time_ns() // 1_000_000}, xx=True)
            except redis.RedisError:
                logger.debug("Dramatiq's heartbeat failed; Redis unreachable")  # the worker's own one says so
