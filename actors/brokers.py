"""The Dramatiq broker and its middleware, built from the settings once per process."""

from __future__ import annotations

import logging
import uuid
from urllib.parse import urlsplit

import dramatiq
import redis
from dramatiq import Consumer
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Callbacks, CurrentMessage, Pipelines, ShutdownNotifications, TimeLimit
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from actors import metrics
from actors.deadletter import DeadLetters
from actors.lifecycle import GracefulStop, Heartbeat
from actors.liveness import WorkerHeartbeat
from actors.logs import MessageLog, redact_dramatiq_records
from actors.retry import Retrying, RetryPolicy
from actors.sendcheck import ValidateOnSend
from kvstore import Keys
from settings import Settings

__all__ = ["MemsyncBroker", "build_broker", "retry_policy", "secrets_of"]

logger = logging.getLogger("memsync.broker")


class MemsyncBroker(RedisBroker):
    """Dramatiq's Redis broker, taking a new worker id whenever a consumer reconnects.

    A fetch that Redis ran but never answered (the connection broke, or Redis restarted) leaves
    messages in this worker's unacknowledged set that the worker never received, and Dramatiq
    drops the delayed messages it held. Dramatiq hands such messages out again only once the
    worker's heartbeat stops; with a new id, the old one stops beating, and after the heartbeat
    timeout the maintenance pass hands them out again. Any of them still running here is then
    applied twice, which the writes are made for.
    """

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        consumed: set[str] = self.__dict__.setdefault("_consumed", set())
        if queue_name in consumed:
            self.broker_id = str(uuid.uuid4())
            logger.info("consumer of %s reconnected: this worker is now %s", queue_name, self.broker_id)
        consumed.add(queue_name)
        return super().consume(queue_name, prefetch, timeout)


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(settings.max_retries, settings.min_backoff_ms, settings.max_backoff_ms)


def secrets_of(settings: Settings, redis_url: str) -> list[str]:
    """The values that must never reach a log line, an error or a dead-letter reason."""
    secrets = [urlsplit(url).password or "" for url in (redis_url, settings.broker_url or "")]
    if settings.openai_api_key is not None:
        secrets.append(settings.openai_api_key.get_secret_value())
    return [secret for secret in secrets if secret]


def _results_backend(redis_url: str, keys: Keys) -> RedisBackend:
    # Waiting for a result blocks in BRPOPLPUSH, which redis-py's default 5 s socket timeout would cut.
    client = redis.Redis.from_url(redis_url, socket_timeout=None)
    return RedisBackend(client=client, namespace=keys.results_namespace())


def build_broker(settings: Settings, redis_url: str) -> dramatiq.Broker:
    """The broker of `BROKER_URL` (by default Redis on `redis_url`), with results stored on `redis_url`."""
    keys = Keys(settings.prefix)
    client = redis.Redis.from_url(redis_url)
    redact_dramatiq_records()
    dead_letters = DeadLetters(client, keys, secrets=secrets_of(settings, redis_url))
    middleware: list[dramatiq.Middleware] = [
        # Prometheus, when MEMSYNC_METRICS_PORT is set: first, so its after-hooks run last (Retrying's first).
        *metrics.middleware(settings),
        TimeLimit(time_limit=settings.time_limit_ms),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        CurrentMessage(),
        Results(  # type: ignore[no-untyped-call]
            backend=_results_backend(redis_url, keys), store_results=True, result_ttl=settings.result_ttl_ms
        ),
        ValidateOnSend(settings.max_value_bytes),
        MessageLog(settings.log_format),  # before Retrying: Dramatiq runs after_* hooks last to first
        Retrying(retry_policy(settings), dead_letters),
        GracefulStop(),
        WorkerHeartbeat(client, keys.workers(), _beat_interval_ms(settings)),
    ]
    if settings.uses_rabbitmq():
        return _rabbitmq_broker(settings.effective_broker_url(), middleware)
    broker_client = client if settings.broker_url is None else redis.Redis.from_url(settings.broker_url)
    return _redis_broker(settings, broker_client, middleware)


def _beat_interval_ms(settings: Settings) -> int:
    return max(250, settings.heartbeat_timeout_ms // 4)


def _redis_broker(
    settings: Settings, client: redis.Redis, middleware: list[dramatiq.Middleware]
) -> MemsyncBroker:
    """A Redis broker whose killed workers' messages come back within seconds."""
    keys = Keys(settings.prefix)
    beat = Heartbeat(client, keys.dramatiq_heartbeats(), _beat_interval_ms(settings))
    return MemsyncBroker(  # type: ignore[no-untyped-call]
        client=client,
        namespace=keys.broker_namespace(),
        middleware=[*middleware, beat],
        heartbeat_timeout=settings.heartbeat_timeout_ms,
        maintenance_chance=settings.maintenance_chance,
    )


def _rabbitmq_broker(url: str, middleware: list[dramatiq.Middleware]) -> dramatiq.Broker:
    """A RabbitMQ broker that returns from `send` once RabbitMQ has confirmed it holds the message.

    RabbitMQ hands a dropped connection's unacknowledged messages back at once, so neither
    MemsyncBroker's new id on reconnect nor Dramatiq's Redis heartbeat has a part here.
    """
    from dramatiq.brokers.rabbitmq import RabbitmqBroker  # pika is loaded only when it is used

    logging.getLogger("pika").setLevel(logging.WARNING)  # else a few INFO lines per connection
    return RabbitmqBroker(url=url, middleware=middleware, confirm_delivery=True)
