"""Real parts for every test: Redis, a Chroma server and an OpenAI-compatible embedding server.

The services start before any test module is imported, because importing `actors` reads the
settings from the environment once per process.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.embedding_server import EmbeddingServer, embedding_server, embedding_server_factory
from tests.support.services import Service, start_chroma, start_redis
from tests.support.worker import print_logs

__all__ = ["embedding_server", "embedding_server_factory"]

API_KEY = "sk-test-SENTINEL-4242-abcdef"
_started: list[Service] = []
_shared: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    base = Path(tempfile.mkdtemp(prefix="memsync-tests-"))
    if not os.environ.get("REDIS_URL"):
        _started.append(start_redis(base / "redis"))
        os.environ["REDIS_URL"] = _started[-1].url
    _started.append(start_chroma(base / "chroma"))
    server = EmbeddingServer(api_key=API_KEY).start()
    _shared.update(server=server, base=base, prefix=f"mstest-{uuid.uuid4().hex[:8]}")
    os.environ.update(
        CHROMA_URL=_started[-1].url,
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=server.base_url,
        EMBEDDING_MODEL="test-embedding",
        MEMSYNC_PREFIX=_shared["prefix"],
        MEMSYNC_DATA_DIR=str(base / "data"),
        MEMSYNC_MIN_BACKOFF_MS="50",
        MEMSYNC_MAX_BACKOFF_MS="400",
        MEMSYNC_EMBEDDING_TIMEOUT_MS="2000",
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if "server" in _shared:
        _shared["server"].stop()
        _clean_redis(os.environ["REDIS_URL"], _shared["prefix"])
    for service in reversed(_started):
        service.stop()


def _clean_redis(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)


@pytest.fixture
def embedding_service() -> Iterator[EmbeddingServer]:
    """The embedding server the workers of this test run use (OPENAI_BASE_URL), reset around each test."""
    server: EmbeddingServer = _shared["server"]
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def redis_url() -> str:
    return os.environ["REDIS_URL"]


@pytest.fixture
def chroma_url() -> str:
    return os.environ["CHROMA_URL"]


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so that tests never see each other's keys."""
    return f"{_shared['prefix']}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def namespace() -> str:
    """A namespace of this test's own."""
    return f"ns-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def data_dir() -> Path:
    return Path(os.environ["MEMSYNC_DATA_DIR"])


@pytest.fixture
def worker_logs(tmp_path: Path) -> Iterator[Path]:
    """A directory for worker logs, printed after the test (pytest shows them when it failed)."""
    yield tmp_path
    print_logs(tmp_path)


@pytest.fixture
def empty_queues() -> None:
    """No message left over from an earlier test (a dropped one comes back), so counts are exact."""
    import actors  # not at the top: importing it reads the environment set in pytest_configure

    actors.broker.flush_all()
