"""The process-wide wiring: settings, broker and runtime, built once, on first use.

Dramatiq binds an actor to a broker when the actor is declared, so the broker is built (and made
Dramatiq's global one) before `actors.tasks` is imported; building it reads the settings but
connects to nothing. Nothing here runs at import: `import actors.errors` or `memsync --help`
reads no setting.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from settings import Settings, load_settings

if TYPE_CHECKING:
    import dramatiq

    from actors.runtime import Runtime

__all__ = ["broker", "configure", "runtime", "settings"]


@dataclass(frozen=True)
class _Wiring:
    settings: Settings
    broker: dramatiq.Broker
    runtime: Runtime


_wiring: _Wiring | None = None
_lock = threading.RLock()  # re-entered: importing actors.tasks asks for the settings


def configure(given: Settings | None = None) -> dramatiq.Broker:
    """Read the settings (or take `given`), build the broker and runtime, and declare the actors.

    Once per process, before anything else uses the wiring: Dramatiq binds the actors to the broker
    they were declared on. Raises SettingsError, naming the variable, when a setting is malformed,
    and RuntimeError when the wiring is built already.
    """
    with _lock:
        if _wiring is not None:
            raise RuntimeError("actors.state.configure() runs once per process, before first use")
        return _configure(given).broker


def _configure(given: Settings | None) -> _Wiring:
    global _wiring
    import dramatiq  # the wiring's imports are paid on first use, not by `memsync --help`

    from actors.brokers import build_broker, secrets_of
    from actors.runtime import Runtime

    with _lock:
        current = given or load_settings()
        redis_url = current.effective_redis_url()
        built = build_broker(current, redis_url)
        dramatiq.set_broker(built)
        runtime_ = Runtime(current, redis_url, current.effective_chroma_url(), secrets_of(current, redis_url))
        _wiring = wiring = _Wiring(current, built, runtime_)
        importlib.import_module("actors.tasks")  # declares the actors on this broker
        return wiring


def _wired() -> _Wiring:
    wiring = _wiring
    if wiring is not None:
        return wiring
    with _lock:
        return _wiring or _configure(None)


def settings() -> Settings:
    return _wired().settings


def broker() -> dramatiq.Broker:
    return _wired().broker


def runtime() -> Runtime:
    return _wired().runtime
