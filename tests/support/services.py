"""Real servers for the tests: an embedded Redis when REDIS_URL is unset, and a Chroma server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from kvstore.server import redis_answers, redis_server_binary
from vectorstore.index import chroma_answers

__all__ = ["Service", "free_port", "start_chroma", "start_redis"]


class Service:
    """A server process the tests started, with the URL to reach it."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: BinaryIO | None = None) -> None:
        self.process = process
        self.url = url
        self.log = log

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.log is not None:
            self.log.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_redis(
    directory: Path, port: int | None = None, *, appendonly: bool = False, password: str | None = None
) -> Service:
    """A redis-server on 127.0.0.1 (AOF with fsync every second when `appendonly`).

    With `password`, the server requires it and the URL carries it: `redis://:password@127.0.0.1:port/0`.
    """
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    command = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(directory),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        "everysec",
    ]
    if password is not None:
        command += ["--requirepass", password]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    auth = "" if password is None else f":{password}@"
    url = f"redis://{auth}127.0.0.1:{port}/0"
    _wait(lambda: redis_answers(url), "redis-server")
    return Service(process, url)


def start_chroma(directory: Path, port: int | None = None) -> Service:
    """`chroma run` on 127.0.0.1, persisting under `directory`."""
    port = port or free_port()
    chroma = shutil.which("chroma") or str(Path(sys.executable).parent / "chroma")
    log = (directory.parent / f"chroma-{port}.log").open("ab")
    command = [chroma, "run", "--path", str(directory), "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: chroma_answers(url), "chroma run")
    return Service(process, url, log)


def _wait(ready: Callable[[], bool], name: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not start within {timeout_s:.0f} s")
