"""An in-process Dramatiq worker over the real broker that `actors` builds from the environment.

`actors` is imported inside the fixtures: this file loads before the root conftest sets the
environment that importing `actors` reads.
"""

from __future__ import annotations

from collections.abc import Iterator

import dramatiq
import pytest

from kvstore import MemoryStore


@pytest.fixture
def worker() -> Iterator[dramatiq.Worker]:
    import actors

    actors.broker.flush_all()
    running = dramatiq.Worker(actors.broker, worker_threads=4, worker_timeout=50)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def store() -> MemoryStore:
    """The store the actors write to."""
    from actors import state

    return state.runtime().store
