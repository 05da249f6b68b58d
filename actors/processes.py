"""The local stack's child processes: started in sessions of their own, stopped one by one in reverse order.

A child in its own session is out of the terminal's foreground process group, so a Ctrl-C reaches
only the process that started it, which then stops the children in order (the worker before the
servers it needs). Signals that arrive while stopping are noted, not obeyed, so that no child is
left behind by a second Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from actors.errors import LocalStackError

__all__ = ["Child", "Children", "Say"]

Say = Callable[[str], object]

_POLL_S = 0.1
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Child:
    """One started process, its log (appended to) and how long it may take to stop."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: BinaryIO
    log_start: int
    stop_timeout_s: float

    def last_log_line(self) -> str:
        """The last non-blank line this process wrote to its log, without colours, or "" if none."""
        with self.log_path.open("rb") as log:
            log.seek(self.log_start)
            text = _ANSI.sub("", log.read().decode("utf-8", errors="replace"))
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""

    def exit_code(self) -> int | None:
        """The exit code once the process has ended, else None.

        The process is left unreaped (a zombie) until `Children.stop_all`, so that its id, which is
        also its group's id, cannot be taken by another process before its group is swept.
        """
        if self.process.returncode is not None:
            return self.process.returncode
        try:
            ended = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere
            return self.process.poll()
        if ended is None:
            return None
        return ended.si_status if ended.si_code == os.CLD_EXITED else -ended.si_status

    def exit_report(self) -> str:
        """One line: that it exited, its last log line, and where the log is."""
        last = self.last_log_line()
        said = f": {last}" if last else ""
        return f"{self.name} exited ({_how(self.exit_code() or 0)}){said}; see {self.log_path}"

    def wait_until_ready(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Poll `ready` until it holds; fail at once if the process exits meanwhile."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.exit_code() is not None:
                raise LocalStackError(self.exit_report())
            if time.monotonic() >= deadline:
                last = self.last_log_line() or "nothing in its log"
                raise LocalStackError(
                    f"{self.name} did not answer within {timeout_s:.0f} s ({last}); see {self.log_path}"
                )
            time.sleep(_POLL_S)


class Children:
    """The processes one stack started, in the order it started them."""

    def __init__(self, logs: Path, say: Say) -> None:
        self.started: list[Child] = []
        self._logs = logs
        self._say = say

    def start(
        self,
        name: str,
        command: list[str],
        *,
        env: dict[str, str] | None = None,
        stop_timeout_s: float = 10.0,
    ) -> Child:
        """Start `command` in a session of its own, its output appended to `logs/<name>.log`."""
        log_path = self._logs / f"{name}.log"
        log = log_path.open("ab")
        try:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        except OSError as err:
            log.close()
            raise LocalStackError(f"could not start {name}: {err.strerror}") from None
        child = Child(name, process, log_path, log, log.tell(), stop_timeout_s)
        self.started.append(child)
        return child

    def stop_all(self) -> None:
        """Stop every child, the last started first, each within its timeout (then killed)."""
        with _signals_noted() as again:
            for child in reversed(self.started):
                self._tell(f"stopping {child.name}...")
                self._stop(child, again)
            self.started.clear()

    def _stop(self, child: Child, again: threading.Event) -> None:
        if child.process.returncode is None:  # not reaped: its id is still its own
            _signal(child.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + child.stop_timeout_s
            while child.exit_code() is None and time.monotonic() < deadline:
                if again.is_set():
                    again.clear()
                    self._tell(f"still stopping {child.name} (at most {child.stop_timeout_s:.0f} s)...")
                time.sleep(_POLL_S)
        if child.process.returncode is None:
            _signal(-child.process.pid, signal.SIGKILL)  # past its timeout, or what it left in its group
        child.process.wait()
        child.log.close()

    def _tell(self, line: str) -> None:
        with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) must not cut the stop short
            self._say(line)


def _how(code: int) -> str:
    """An exit code in words: `code 1`, or `killed by SIGKILL` for the negative codes of signals."""
    if code >= 0:
        return f"code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _signal(pid: int, signum: signal.Signals) -> None:
    """`os.kill`, where a negative id names a process group; one that has ended already is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


@contextmanager
def _signals_noted() -> Iterator[threading.Event]:
    """While stopping, Ctrl-C, SIGTERM and SIGHUP set an event instead of interrupting the stop."""
    again = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield again
        return
    previous = {signum: signal.getsignal(signum) for signum in _DEFERRED_SIGNALS}
    for signum in _DEFERRED_SIGNALS:
        signal.signal(signum, lambda *_: again.set())
    try:
        yield again
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
