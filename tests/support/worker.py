"""The Procfile's worker, run for real: `bash -c "<the worker: line>"` in a process group of its own.

Tests send messages from their own process and watch a real Dramatiq worker (main process and
worker processes) apply them, be killed, or be stopped by signals as a PaaS stops a dyno.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final, TypeVar

__all__ = [
    "PROJECT_ROOT",
    "READY_LINE",
    "WORKER_DEFAULTS",
    "group_members",
    "print_logs",
    "procfile_command",
    "running_worker",
    "signal_group",
    "wait_until",
    "worker_environment",
]

T = TypeVar("T")

PROJECT_ROOT: Final = Path(__file__).resolve().parents[2]
#: What Dramatiq logs once per worker process that has booted and consumes.
READY_LINE: Final = "Worker process is ready for action."
#: Small enough for a test machine; a test's overrides win.
WORKER_DEFAULTS: Final = {"MEMSYNC_PROCESSES": "1", "MEMSYNC_THREADS": "2"}
_STOP_TIMEOUT_S: Final = 10.0


def procfile_command(process_type: str = "worker", procfile: Path = PROJECT_ROOT / "Procfile") -> str:
    """The command of one line of the Procfile (`worker: <command>`), as a shell would run it."""
    for line in procfile.read_text(encoding="utf-8").splitlines():
        name, colon, command = line.partition(":")
        if colon and name.strip() == process_type:
            return command.strip()
    raise LookupError(f"{procfile} has no {process_type!r} line")


def worker_environment(env_overrides: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment (the test services' URLs) with the worker defaults and overrides."""
    # The Procfile names `dramatiq` bare: on a PaaS the app's virtualenv is on PATH, so put ours there.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **WORKER_DEFAULTS, **(env_overrides or {})}


@contextmanager
def running_worker(env_overrides: dict[str, str] | None, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run the Procfile's worker for the block, its output appended to `log_path`.

    The worker leads a new process group (`process.pid` is its id), which is SIGKILLed at the end
    whatever happened, so no worker outlives its test.
    """
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            ["bash", "-c", procfile_command()],
            cwd=PROJECT_ROOT,
            env=worker_environment(env_overrides),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            _kill_group(process)


def signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    """Send `signum` to every process of the worker's group, as honcho and Heroku do."""
    os.killpg(process.pid, signum)


def group_members(pgid: int) -> list[int]:
    """The processes of a group that still run (zombies left to init do not count)."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    return [pid for pid, group, state in _proc_stats() if group == pgid and state != "Z"]


def _proc_stats() -> Iterator[tuple[int, int, str]]:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        # The command name may hold spaces and parentheses; the fields after the last ")" do not.
        state, _ppid, pgrp, *_ = text.rpartition(")")[2].split()
        yield int(stat.parent.name), int(pgrp), state


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, *, interval_s: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def print_logs(directory: Path) -> None:
    """Print every `*.log` under `directory`; pytest shows it only when the test failed."""
    for log in sorted(directory.glob("*.log")):
        print(f"----- {log.name} -----")
        print(log.read_text(encoding="utf-8", errors="replace"))


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=_STOP_TIMEOUT_S)
    wait_until(lambda: not group_members(process.pid), _STOP_TIMEOUT_S, f"process group {process.pid} to end")
