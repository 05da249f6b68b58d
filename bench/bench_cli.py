"""How long the `memsync` command takes to start, beside a bare Python start, in one run.

Each command runs as a new process, as a user's shell runs it, `ROUNDS` times in turn; the medians
and their ratio to `python -c pass` are printed. `get` runs against a Redis that refuses at once
(a free port), so it measures the start and the error path, not a server.
Run: python bench/bench_cli.py
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROUNDS = 7
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "memsync --help": [str(BIN / "memsync"), "--help"],
    "memsync search --help": [str(BIN / "memsync"), "search", "--help"],
    "memsync get k (Redis refusing)": [str(BIN / "memsync"), "get", "k"],
    "import actors.errors": [sys.executable, "-c", "import actors.errors"],
}


def _seconds(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, capture_output=True, check=False)
    return time.perf_counter() - started


def main() -> None:
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0",
        "CHROMA_URL": "http://127.0.0.1:1",
    }
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(ROUNDS):
        for name, command in COMMANDS.items():
            times[name].append(_seconds(command, env))
    base = statistics.median(times["python -c pass"])
    print(f"{'command':34} {'median s':>9} {'x python':>9}")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"{name:34} {median:9.3f} {median / base:9.1f}")


if __name__ == "__main__":
    main()
