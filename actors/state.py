"""The process-wide wiring: settings, broker and runtime, configured once when `actors` is imported.

Dramatiq binds an actor to a broker when the actor is declared, so the broker has to exist before
`actors.tasks` is imported; building it reads the settings but connects to nothing.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from actors.broker import build_broker, secrets_of
from actors.runtime import Runtime
from settings import Settings, load_settings

__all__ = ["broker", "configure", "runtime", "settings"]

_settings: Settings | None = None
_runtime: Runtime | None = None
_broker: RedisBroker | None = None


def configure(given: Settings | None = None) -> RedisBroker:
    """Read the settings, build the broker and the runtime, and make the broker Dramatiq's global one."""
    global _settings, _runtime, _broker
    _settings = given or load_settings()
    redis_url = _settings.effective_redis_url()
    _broker = broker = build_broker(_settings, redis_url)
    dramatiq.set_broker(broker)
    _runtime = Runtime(
        _settings, redis_url, _settings.effective_chroma_url(), secrets_of(_settings, redis_url)
    )
    return broker


def settings() -> Settings:
    if _settings is None:
        raise RuntimeError("actors.state.configure() has not run")
    return _settings


def broker() -> RedisBroker:
    if _broker is None:
        raise RuntimeError("actors.state.configure() has not run")
    return _broker


def runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("actors.state.configure() has not run")
    return _runtime
