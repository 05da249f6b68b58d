"""The local stack: `memsync up` stopped by Ctrl-C, and ports that belong to one data directory only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path

import pytest
import redis

from actors.errors import LocalStackError
from actors.local import LocalStack, local_stack
from kvstore import MemoryStore
from kvstore.server import redis_answers
from settings import Settings
from tests.support.embedding_server import EmbeddingServer, EmbeddingServerFactory
from tests.support.services import free_port, start_redis
from tests.support.worker import wait_until
from vectorstore.index import chroma_answers

MEMSYNC = Path(sys.executable).parent / "memsync"
KEYS = [f"pref-{n}" for n in range(4)]
NAMESPACE = "user-7"


def _settings(data_dir: Path, redis_port: int, chroma_port: int) -> Settings:
    return Settings.model_validate(
        {
            "REDIS_URL": None,
            "CHROMA_URL": None,
            "MEMSYNC_DATA_DIR": data_dir,
            "MEMSYNC_LOCAL_REDIS_PORT": redis_port,
            "MEMSYNC_LOCAL_CHROMA_PORT": chroma_port,
        }
    )


def _port_is_free(port: int) -> bool:
    with closing(socket.socket()) as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _descendants(root: int) -> set[int]:
    """The running processes under `root` (children, their children, ...), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, *_ = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if state != "Z":
            parents[int(stat.parent.name)] = int(ppid)
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


class _Up:
    """`memsync up` as a terminal runs it: its own process group, its output read line by line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [str(MEMSYNC), "up"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to every process of the terminal's foreground group."""
        os.killpg(self.process.pid, signal.SIGINT)

    def finish(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        self._close()
        return code

    def _close(self) -> None:
        if self.process.stdout is not None:
            self.process.stdout.close()

    def kill(self) -> None:
        for pid in _descendants(self.process.pid) | {self.process.pid}:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        self._close()


def _up_environment(
    data_dir: Path, redis_port: int, chroma_port: int, server: EmbeddingServer
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CHROMA_URL")}
    env.update(
        MEMSYNC_DATA_DIR=str(data_dir),
        MEMSYNC_LOCAL_REDIS_PORT=str(redis_port),
        MEMSYNC_LOCAL_CHROMA_PORT=str(chroma_port),
        OPENAI_BASE_URL=server.base_url,
    )
    return env


def _send_syncs(env: dict[str, str], redis_url: str, chroma_url: str) -> None:
    script = (
        "from actors import memory_sync\n"
        f"for key in {KEYS!r}:\n"
        f"    memory_sync.send(key=key, value='likes ' + key, embed=True, namespace={NAMESPACE!r})\n"
    )
    sender = {**env, "REDIS_URL": redis_url, "CHROMA_URL": chroma_url}
    subprocess.run([sys.executable, "-c", script], env=sender, check=True, timeout=60)


def _applied_values(data_dir: Path, redis_port: int) -> dict[str, object]:
    """The values the stopped stack's Redis kept on disk, read back from its AOF."""
    service = start_redis(data_dir / "redis", redis_port, appendonly=True)
    try:
        with redis.Redis.from_url(service.url) as client:
            store = MemoryStore(client, prefix=os.environ["MEMSYNC_PREFIX"])
            return {key: store.get(key, namespace=NAMESPACE) for key in KEYS}
    finally:
        service.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("presses", [1, 2], ids=["once", "twice"])
def test_ctrl_c_on_up_stops_the_worker_then_chroma_then_redis_and_leaves_nothing_behind(
    tmp_path: Path, embedding_server_factory: EmbeddingServerFactory, presses: int
) -> None:
    server = embedding_server_factory(latency_ms=1_500)  # the syncs are still running at the Ctrl-C
    data_dir, redis_port, chroma_port = tmp_path / "data", free_port(), free_port()
    env = _up_environment(data_dir, redis_port, chroma_port, server)
    up = _Up(env)
    try:
        wait_until(lambda: any(line.startswith("started:") for line in up.lines), 90, "up to start")
        _send_syncs(env, f"redis://127.0.0.1:{redis_port}/0", f"http://127.0.0.1:{chroma_port}")
        wait_until(lambda: server.embedding_requests, 30, "the worker to run the syncs")
        children = _descendants(up.process.pid)  # Redis, Chroma, the worker and its worker process
        up.interrupt()
        if presses == 2:
            wait_until(lambda: "stopping worker..." in up.lines, 30, "the stop to begin")
            up.interrupt()
        code = up.finish(timeout_s=60)
    finally:
        if up.process.poll() is None:
            up.kill()
    output = up.output()
    stops = [line for line in up.lines if line.startswith("stopping") or line == "stopped"]
    assert code == 0, output
    assert stops == ["stopping worker...", "stopping chroma...", "stopping redis...", "stopped"], output
    assert "Traceback" not in output
    assert len(children) >= 4 and not [pid for pid in children if _alive(pid)], output
    assert presses == 1 or any(line.startswith("still stopping") for line in up.lines), output
    assert _port_is_free(redis_port) and _port_is_free(chroma_port)
    worker_log = (data_dir / "logs" / "worker.log").read_text(encoding="utf-8", errors="replace")
    assert "could not requeue" not in worker_log
    assert "Traceback" not in worker_log
    assert _applied_values(data_dir, redis_port) == {key: f"likes {key}" for key in KEYS}


# --- ports that belong to one data directory ------------------------------------------------------


@pytest.fixture(scope="module")
def first_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, LocalStack]]:
    """A running stack of one data directory, that the tests beside it must leave alone."""
    settings = _settings(tmp_path_factory.mktemp("first"), free_port(), free_port())
    with local_stack(settings) as stack:
        with redis.Redis.from_url(stack.redis_url) as client:
            client.set("first-stack-marker", "mine")
        yield settings, stack


def _first_is_untouched(stack: LocalStack) -> bool:
    with redis.Redis.from_url(stack.redis_url) as client:
        marker = client.get("first-stack-marker")
    return marker == b"mine" and chroma_answers(stack.chroma_url)


@pytest.mark.timeout(120)
def test_a_second_data_directory_refuses_the_redis_port_of_the_first(
    first_stack: tuple[Settings, LocalStack], tmp_path: Path
) -> None:
    first, stack = first_stack
    second = _settings(tmp_path / "second", first.local_redis_port, free_port())
    with pytest.raises(LocalStackError) as refused, local_stack(second):
        pass
    message = str(refused.value)
    assert f"port {first.local_redis_port}" in message and "MEMSYNC_LOCAL_REDIS_PORT" in message
    assert "another Redis" in message and "\n" not in message
    assert _port_is_free(second.local_chroma_port)  # it started nothing
    assert _first_is_untouched(stack)


@pytest.mark.timeout(120)
def test_a_second_data_directory_refuses_the_chroma_port_of_the_first(
    first_stack: tuple[Settings, LocalStack], tmp_path: Path
) -> None:
    first, stack = first_stack
    second = _settings(tmp_path / "second", free_port(), first.local_chroma_port)
    with pytest.raises(LocalStackError) as refused, local_stack(second):
        pass
    message = str(refused.value)
    assert f"port {first.local_chroma_port}" in message and "MEMSYNC_LOCAL_CHROMA_PORT" in message
    assert "\n" not in message
    assert not redis_answers(f"redis://127.0.0.1:{second.local_redis_port}/0")  # its Redis was stopped
    assert _first_is_untouched(stack)


@pytest.mark.timeout(120)
def test_the_same_data_directory_reuses_its_running_servers(first_stack: tuple[Settings, LocalStack]) -> None:
    first, stack = first_stack
    with local_stack(first) as again:
        assert again.started == []
        assert (again.redis_url, again.chroma_url) == (stack.redis_url, stack.chroma_url)
    assert _first_is_untouched(stack)  # leaving a reusing block stops nothing


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("service", "setting"), [("redis", "MEMSYNC_LOCAL_REDIS_PORT"), ("chroma", "MEMSYNC_LOCAL_CHROMA_PORT")]
)
def test_a_port_taken_by_another_program_fails_at_once_naming_the_port_and_the_setting(
    tmp_path: Path, service: str, setting: str
) -> None:
    with closing(socket.socket()) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = (taken, free_port()) if service == "redis" else (free_port(), taken)
        settings = _settings(tmp_path, *ports)
        with pytest.raises(LocalStackError) as refused, local_stack(settings):
            pass
    message = str(refused.value)
    assert f"port {taken}" in message and setting in message and "another program" in message
    assert "\n" not in message
    assert all(_port_is_free(port) for port in ports)


@pytest.mark.timeout(120)
def test_a_server_that_exits_while_starting_fails_at_once_with_the_last_line_of_its_log(
    tmp_path: Path,
) -> None:
    aof = tmp_path / "redis" / "appendonlydir"
    aof.mkdir(parents=True)
    (aof / "appendonly.aof.manifest").write_text("this is not a manifest\n")
    settings = _settings(tmp_path, free_port(), free_port())
    with pytest.raises(LocalStackError) as refused, local_stack(settings):
        pass
    message = str(refused.value)
    assert message.startswith("redis exited") and "manifest" in message.lower(), message
    assert "redis.log" in message and "\n" not in message


@pytest.mark.timeout(120)
def test_up_stops_the_rest_and_says_why_when_one_of_its_servers_dies(
    tmp_path: Path, embedding_server_factory: EmbeddingServerFactory
) -> None:
    data_dir, redis_port, chroma_port = tmp_path / "data", free_port(), free_port()
    up = _Up(_up_environment(data_dir, redis_port, chroma_port, embedding_server_factory()))
    try:
        wait_until(lambda: any(line.startswith("started:") for line in up.lines), 90, "up to start")
        with redis.Redis.from_url(f"redis://127.0.0.1:{redis_port}/0") as client:
            os.kill(int(client.info("server")["process_id"]), signal.SIGKILL)
        code = up.finish(timeout_s=60)
    finally:
        if up.process.poll() is None:
            up.kill()
    output = up.output()
    errors = [line for line in up.lines if line.startswith("error:")]
    assert code == 1, output
    assert len(errors) == 1 and "redis exited" in errors[0] and "redis.log" in errors[0], output
    assert "stopping worker..." in up.lines and "stopping chroma..." in up.lines, output
    assert "Traceback" not in output
    assert _port_is_free(chroma_port)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_while_the_stack_starts_stops_what_had_started(
    tmp_path: Path, embedding_server_factory: EmbeddingServerFactory, signum: signal.Signals
) -> None:
    server = embedding_server_factory()
    data_dir, redis_port, chroma_port = tmp_path / "data", free_port(), free_port()
    up = _Up(_up_environment(data_dir, redis_port, chroma_port, server))
    try:
        # Redis answers within a fraction of a second; Chroma takes seconds: the signal lands in between.
        wait_until(lambda: not _port_is_free(redis_port), 60, "the stack's Redis to start")
        children = _descendants(up.process.pid)
        os.kill(up.process.pid, signum)  # to `memsync up` alone, as a supervisor or a closed terminal does
        code = up.finish(timeout_s=60)
    finally:
        if up.process.poll() is None:
            up.kill()
    assert code != 0 and children, up.output()
    assert not [pid for pid in children if _alive(pid)], up.output()
    assert _port_is_free(redis_port) and _port_is_free(chroma_port)
