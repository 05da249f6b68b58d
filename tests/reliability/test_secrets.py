"""Secrets: with a sentinel API key and a Redis password in REDIS_URL, neither ever shows.

A Redis of this module's own requires a password, so REDIS_URL is `redis://:<password>@host:port/0`,
and OPENAI_API_KEY is the sentinel that an embedding server of this module's own requires. Told to
fail, that server echoes the key back in its error messages, in full and masked, as a careless
upstream would. The Procfile worker runs with verbose logging through successes, transient failures
(500, 429, a timeout), failures for good (retries exhausted, 400, 401), invalid payloads and a Redis
outage; the `memsync` CLI inspects what it left; one-off runs fail in every way they can; bad
settings stop start-up. No log line, output, dead-letter reason, stored result or other value in
that Redis may hold the password, the key, or the key's masked form.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import dramatiq
import pytest
import redis
from dramatiq.results import ResultFailure, Results
from dramatiq.results.backends import RedisBackend

from actors import memory_sync, state
from actors.brokers import build_broker
from actors.deadletter import DeadLetter, DeadLetters
from actors.sendcheck import ValidateOnSend
from kvstore import Keys
from tests.conftest import API_KEY
from tests.reliability.conftest import Report
from tests.support.embedding_server import TIMEOUT, EmbeddingServer, FaultKind, mask_key
from tests.support.services import Service, free_port, start_redis
from tests.support.worker import (
    READY_LINE,
    group_members,
    print_logs,
    running_worker,
    wait_until,
    worker_environment,
)

REDIS_PASSWORD: Final = "redis-SENTINEL-5150-hunter2"
SECRETS: Final = {
    "the Redis password": REDIS_PASSWORD,
    "the API key": API_KEY,
    "the masked API key": mask_key(API_KEY),
}
#: What the embedding server says in its errors: the key in full and masked.
ECHO: Final = f"Incorrect API key provided: {API_KEY} ({mask_key(API_KEY)})"
MEMSYNC: Final = str(Path(sys.executable).parent / "memsync")
ONE_OFF: Final = [sys.executable, "-m", "actors"]
WAIT_MS: Final = 30_000
#: The shortest Redis outage: longer than the worker's heartbeat interval (MEMSYNC_HEARTBEAT_TIMEOUT_MS / 4).
OUTAGE_S: Final = 4.0

Runs = dict[str, subprocess.CompletedProcess[str]]


def leaks(texts: dict[str, str]) -> list[str]:
    """Where each secret shows in `texts` (where -> text), with some context."""
    found = []
    for where, text in texts.items():
        for name, secret in SECRETS.items():
            if (at := text.find(secret)) >= 0:
                found.append(f"{name} in {where}: ...{text[max(0, at - 120) : at + 60]!r}")
    return found


def outputs(runs: Runs) -> dict[str, str]:
    return {f"`{name}`": f"{run.stdout}\n{run.stderr}" for name, run in runs.items()}


@dataclass(frozen=True)
class Fault:
    """What the embedding server answers the next `count` requests with."""

    status: FaultKind
    message: str | None = ECHO
    count: int = 1
    retry_after_s: float | None = None

    def arm(self, server: EmbeddingServer) -> None:
        server.fail_next(self.status, self.count, message=self.message, retry_after_s=self.retry_after_s)


class SecretRedis:
    """A redis-server that requires REDIS_PASSWORD (AOF on), which can go down and come back on its port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.service = self._start(None)
        self.url = self.service.url

    def _start(self, port: int | None) -> Service:
        return start_redis(self.directory, port, appendonly=True, password=REDIS_PASSWORD)

    def down(self) -> None:
        self.service.stop()

    def up(self) -> None:
        self.service = self._start(urlsplit(self.url).port)


@pytest.fixture(scope="module")
def secret_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretRedis]:
    server = SecretRedis(tmp_path_factory.mktemp("secret-redis"))
    yield server
    server.down()


@pytest.fixture(scope="module")
def key_server() -> Iterator[EmbeddingServer]:
    """An embedding server that requires API_KEY and, told to fail, echoes it back."""
    with EmbeddingServer(api_key=API_KEY) as server:
        yield server


def secret_env(redis_url: str, server: EmbeddingServer) -> dict[str, str]:
    """The settings of every process here (a prefix of their own): the password in REDIS_URL, the key."""
    return {
        "REDIS_URL": redis_url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_BASE_URL": server.base_url,
        "MEMSYNC_PREFIX": f"secrets-{uuid.uuid4().hex[:8]}",
        "MEMSYNC_EMBEDDING_TIMEOUT_MS": "3000",
    }


def run_processes(commands: dict[str, tuple[list[str], dict[str, str]]], cwd: Path) -> Runs:
    """Run each command with its settings, side by side (each imports memsync: seconds apiece)."""
    running = {
        name: subprocess.Popen(
            command,
            env=worker_environment(env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (command, env) in commands.items()
    }
    done = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=90)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done


def one_off(env: dict[str, str], payload: str) -> dict[str, str]:
    return {**env, "WORKER_JOB": "MEMORY_SYNC", "WORKER_PAYLOAD": payload}


def redis_values(client: redis.Redis, skip: set[bytes]) -> dict[str, str]:
    """Every value in the database, by key, as text."""
    return {
        f"Redis key {key!r}": _contents(client, key)
        for key in client.scan_iter(count=1000)
        if key not in skip
    }


def _contents(client: Any, key: bytes) -> str:
    readers: dict[bytes, Callable[[], list[Any]]] = {
        b"string": lambda: [client.get(key)],
        b"hash": lambda: [item for pair in client.hgetall(key).items() for item in pair],
        b"list": lambda: list(client.lrange(key, 0, -1)),
        b"set": lambda: list(client.smembers(key)),
        b"zset": lambda: list(client.zrange(key, 0, -1)),
        b"stream": lambda: [str(entry) for entry in client.xrange(key)],
    }
    items = readers.get(client.type(key), list)()
    return "\n".join(
        item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in items
    )


# --- the worker under faults ---------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One message of the worker run: the faults the embedding server has ready, and whether it fails."""

    name: str
    fields: dict[str, Any]
    faults: tuple[Fault, ...] = ()
    fails: bool = False


STEPS: Final = [
    Step("applied", {"value": "the user likes dark mode"}),
    Step("a 500 echoing the key, then applied", {"value": "a second"}, (Fault(500),)),
    Step("a 429 echoing the key, then applied", {"value": "a third"}, (Fault(429, retry_after_s=0.2),)),
    Step("a timeout, then applied", {"value": "a fourth"}, (Fault(TIMEOUT, None),)),
    Step("500s echoing the key past the retries", {"value": "lost"}, (Fault(500, count=4),), True),
    Step("a 400 echoing the key", {"value": "rejected"}, (Fault(400),), True),
    Step("a 401 echoing the key, full and masked", {"value": "refused"}, (Fault(401),), True),
    Step("a NaN value", {"value": float("nan")}, fails=True),
    Step("a control character in the key", {"value": "v", "key": "a\x1bb"}, fails=True),
    Step("an unknown field", {"value": "v", "password": "not the one"}, fails=True),
]
#: An upstream that echoes the Redis password: the embedder cannot know it, so only the scrubs can help.
PASSWORD_ECHO: Final = Step(
    "a 400 echoing the Redis password", {"value": "x"}, (Fault(400, f"bad: {REDIS_PASSWORD}"),), True
)
AFTER_OUTAGE: Final = Step("applied after the Redis outage", {"value": "back again"})
IN_FLIGHT: Final = Step("in flight as Redis goes down", {"value": "caught in the outage"})


@dataclass
class WorkerRun:
    """What a worker run under faults left behind, by where it was found."""

    log: str = ""
    dead_letters: list[DeadLetter] = field(default_factory=list)
    results: dict[str, str] = field(default_factory=dict)
    cli: Runs = field(default_factory=dict)
    redis: dict[str, str] = field(default_factory=dict)
    password_echo_result: str = ""
    statuses: list[int | None] = field(default_factory=list)


class Sender:
    """Sends to, and reads the results of, the worker on one prefix (`actors.broker` is the session's)."""

    def __init__(self, env: dict[str, str], server: EmbeddingServer, namespace: str) -> None:
        settings = state.settings().model_copy(update={"prefix": env["MEMSYNC_PREFIX"]})
        self.broker: dramatiq.Broker = build_broker(settings, env["REDIS_URL"])
        # Unchecked, as an older sender: the NaN step must reach the worker, whose refusal is tested.
        self.broker.middleware[:] = [m for m in self.broker.middleware if not isinstance(m, ValidateOnSend)]
        results = next(middleware for middleware in self.broker.middleware if isinstance(middleware, Results))
        self.backend: RedisBackend = results.backend
        self.server, self.namespace = server, namespace

    def send(self, step: Step, key: str) -> dramatiq.Message[Any]:
        """Arm the step's faults and send its message."""
        for fault in step.faults:
            fault.arm(self.server)
        fields = {"key": key, "embed": True, "namespace": self.namespace, **step.fields}
        message: dramatiq.Message[Any] = memory_sync.message(**fields)
        self.broker.enqueue(message)
        return message

    def run(self, step: Step, key: str) -> tuple[dramatiq.Message[Any], str]:
        """Send the step's message; its result or stored failure, as text."""
        message = self.send(step, key)
        try:
            result = message.get_result(backend=self.backend, block=True, timeout=WAIT_MS)
        except ResultFailure as failure:
            assert step.fails, f"{step.name}: failed: {failure}"
            return message, str(failure)
        assert not step.fails and result["status"] == "success", f"{step.name}: {result}"
        return message, str(result)


def cli_while_redis_is_down(
    secret_redis: SecretRedis, sender: Sender, env: dict[str, str], cwd: Path
) -> Runs:
    """Take Redis down in the middle of a message (its embedding is slow), use the CLI, bring Redis back.

    The worker's write then fails mid-message (redis-py's error, translated, logged with its traceback).
    """
    requests, sender.server.latency_ms = len(sender.server.embedding_requests), 2500
    sender.send(IN_FLIGHT, "in-flight")
    wait_until(lambda: len(sender.server.embedding_requests) > requests, 30, "the in-flight embedding")
    secret_redis.down()
    sender.server.latency_ms, down_at = 0, time.monotonic()
    try:
        return run_processes(
            {
                "memsync get (Redis down)": ([MEMSYNC, "get", "k0"], env),
                "memsync dlq list (Redis down)": ([MEMSYNC, "dlq", "list"], env),
            },
            cwd,
        )
    finally:
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))  # long enough for a missed heartbeat
        secret_redis.up()


def cli_afterwards(namespace: str, env: dict[str, str], cwd: Path, server: EmbeddingServer) -> Runs:
    Fault(401).arm(server)
    search = [MEMSYNC, "search", "dark mode", "--namespace", namespace]
    done = run_processes({"memsync search (a 401 echoing the key)": (search, env)}, cwd)
    commands = {
        "memsync dlq list": [MEMSYNC, "dlq", "list"],
        "memsync dlq list --json": [MEMSYNC, "dlq", "list", "--json"],
        "memsync get": [MEMSYNC, "get", "k0", "--namespace", namespace],
        "memsync search": search,
        "memsync reconcile --json": [MEMSYNC, "reconcile", "--json"],
    }
    return done | run_processes({name: (command, env) for name, command in commands.items()}, cwd)


@pytest.fixture(scope="module")
def worker_run(
    secret_redis: SecretRedis, key_server: EmbeddingServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerRun]:
    """The Procfile worker (verbose) through every step and a Redis outage, then the CLI; what it all left."""
    logs, env, run = (
        tmp_path_factory.mktemp("secret-worker"),
        secret_env(secret_redis.url, key_server),
        WorkerRun(),
    )
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    sender, log = Sender(env, key_server, namespace), logs / "worker.log"
    key_server.reset()
    # The Procfile leaves ${MEMSYNC_THREADS} unquoted: that is how --verbose gets through it.
    with running_worker({**env, "MEMSYNC_THREADS": "2 --verbose"}, log) as worker:
        wait_until(lambda: READY_LINE in log.read_text(errors="replace"), 60, "the worker to boot")
        for index, step in enumerate(STEPS):
            run.results[step.name] = sender.run(step, f"k{index}")[1]
        echoed, run.password_echo_result = sender.run(PASSWORD_ECHO, "echo")
        run.cli = cli_while_redis_is_down(secret_redis, sender, env, logs)
        run.results[AFTER_OUTAGE.name] = sender.run(AFTER_OUTAGE, "after")[1]
        assert group_members(worker.pid), "the worker died"
    run.cli |= cli_afterwards(namespace, env, logs, key_server)
    client = redis.Redis.from_url(secret_redis.url)
    run.log, run.dead_letters = (
        log.read_text(errors="replace"),
        DeadLetters(client, Keys(env["MEMSYNC_PREFIX"])).all(),
    )
    run.redis = redis_values(client, skip={sender.backend.build_message_key(echoed).encode()})
    run.statuses = [request.status for request in key_server.embedding_requests]
    print_logs(logs)
    yield run
    sender.broker.close()
    client.close()


@pytest.mark.timeout(240)
def test_no_worker_log_line_holds_a_secret(worker_run: WorkerRun, reliability_report: Report) -> None:
    assert {400, 401, 429, 500, None} <= set(worker_run.statuses), "the faults did not all happen"
    lines = worker_run.log.splitlines()
    assert any("[DEBUG]" in line for line in lines), "the worker did not log verbosely"
    assert any("outcome=retrying" in line for line in lines), "no transient failure was logged"
    assert any("heartbeat failed" in line for line in lines), "the Redis outage was not logged"
    assert any("error=StoreUnreachable" in line for line in lines), "no write met the outage"
    assert leaks({f"worker log line {number}": line for number, line in enumerate(lines, 1)}) == []
    reliability_report(
        "secrets: worker log under faults",
        f"{len(lines)} log lines (verbose), {len(STEPS) + 3} messages, one Redis outage mid-message",
        "no line holds the Redis password, the API key or its masked form, tracebacks included",
    )


@pytest.mark.timeout(240)
def test_no_dead_letter_holds_a_secret(worker_run: WorkerRun, reliability_report: Report) -> None:
    letters, failing = worker_run.dead_letters, [step for step in [*STEPS, PASSWORD_ECHO] if step.fails]
    assert len(letters) == len(failing), [letter.reason for letter in letters]
    assert all(letter.reason for letter in letters)
    assert leaks({f"dead letter {letter.message_id}": str(vars(letter)) for letter in letters}) == []
    assert sum("***" in letter.reason for letter in letters) >= 4, "secrets were echoed but never scrubbed"
    reliability_report(
        "secrets: dead letters",
        f"{len(letters)} dead letters (retries exhausted, 400, 401, invalid payloads, an echoed password)",
        "no reason, nor any other field, holds a secret",
    )


@pytest.mark.timeout(240)
def test_no_stored_result_or_other_redis_value_holds_a_secret(
    worker_run: WorkerRun, reliability_report: Report
) -> None:
    stored = {f"stored result of {name!r}": text for name, text in worker_run.results.items()}
    assert leaks({**stored, **worker_run.redis}) == []
    reliability_report(
        "secrets: stored results and every Redis value",
        f"{len(stored)} results read back, {len(worker_run.redis)} Redis keys",
        "no value in that Redis (results, queues, records, history, dead letters) holds a secret",
    )


@pytest.mark.timeout(240)
def test_a_secret_the_embedder_cannot_know_is_scrubbed_from_the_stored_result(worker_run: WorkerRun) -> None:
    assert leaks({"the stored result": worker_run.password_echo_result}) == []


@pytest.mark.timeout(240)
def test_no_cli_output_holds_a_secret(worker_run: WorkerRun, reliability_report: Report) -> None:
    codes = {name: run.returncode for name, run in worker_run.cli.items()}
    failing = {
        "memsync get (Redis down)",
        "memsync dlq list (Redis down)",
        "memsync search (a 401 echoing the key)",
    }
    assert {name for name, code in codes.items() if code} == failing, {
        name: run.stderr[-500:] for name, run in worker_run.cli.items()
    }
    assert "***" in worker_run.cli["memsync dlq list"].stdout, "no scrubbed reason was listed"
    assert leaks(outputs(worker_run.cli)) == []
    reliability_report(
        "secrets: `memsync` CLI output",
        f"{len(codes)} commands: dlq list (and --json), get, search, reconcile; two with Redis down, one 401",
        "no stdout or stderr holds a secret",
    )


# --- one-off runs and start-up -------------------------------------------------------------------

#: One-off runs that meet a fault of the embedding server: one at a time, each after its fault.
ONE_OFF_FAULTS: Final = {
    "a 401 echoing the key": Fault(401),
    "500s echoing the key past the retries": Fault(500, count=4),
    "a 400 echoing the Redis password": Fault(400, f"bad: {REDIS_PASSWORD}"),
}


@pytest.mark.timeout(180)
def test_no_one_off_run_prints_a_secret(
    secret_redis: SecretRedis, key_server: EmbeddingServer, tmp_path: Path, reliability_report: Report
) -> None:
    env, done = secret_env(secret_redis.url, key_server), Runs()
    key_server.reset()
    for name, fault in ONE_OFF_FAULTS.items():
        fault.arm(key_server)
        done |= run_processes(
            {name: (ONE_OFF, one_off(env, '{"key": "k", "value": "v", "embed": true}'))}, tmp_path
        )
    unreachable = {**env, "REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0"}
    done |= run_processes(
        {
            "applied": (ONE_OFF, one_off(env, '{"key": "k", "value": "a memory", "embed": true}')),
            "NaN": (ONE_OFF, one_off(env, '{"key": "k", "value": NaN}')),
            "Redis unreachable": (ONE_OFF, one_off(unreachable, '{"key": "k", "value": 1}')),
        },
        tmp_path,
    )
    codes = {name: run.returncode for name, run in done.items()}
    wanted = {**dict.fromkeys(ONE_OFF_FAULTS, 1), "applied": 0, "NaN": 2, "Redis unreachable": 1}
    assert codes == wanted, {name: run.stderr[-500:] for name, run in done.items()}
    assert "***" in done["a 400 echoing the Redis password"].stderr
    assert leaks(outputs(done)) == []
    reliability_report(
        "secrets: one-off runs",
        f"{len(done)} `python -m actors`: applied, 401, 500s, 400 echoing the password, NaN, no Redis",
        "no stdout or stderr holds a secret",
    )


#: Bad settings whose values are the secrets themselves, and a REDIS_URL that cannot be parsed.
BAD_SETTINGS: Final = {
    "secrets as bad numbers": {"MEMSYNC_MAX_RETRIES": API_KEY, "EMBEDDING_DIMENSIONS": REDIS_PASSWORD},
    "a REDIS_URL that cannot parse": {"REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:port/0"},
}


@pytest.mark.timeout(180)
def test_bad_settings_stop_start_up_without_showing_a_secret(
    secret_redis: SecretRedis, key_server: EmbeddingServer, tmp_path: Path, reliability_report: Report
) -> None:
    env = secret_env(secret_redis.url, key_server)
    commands = {}
    for name, bad in BAD_SETTINGS.items():
        commands[f"one-off, {name}"] = (ONE_OFF, one_off({**env, **bad}, "{}"))
        commands[f"memsync dlq list, {name}"] = ([MEMSYNC, "dlq", "list"], {**env, **bad})
    done, log = run_processes(commands, tmp_path), tmp_path / "worker.log"
    with running_worker({**env, **BAD_SETTINGS["secrets as bad numbers"]}, log) as worker:
        wait_until(lambda: worker.poll() is not None, 60, "the worker to stop by itself")
    texts = {**outputs(done), "the worker's log": log.read_text(errors="replace")}
    assert worker.returncode != 0 and all(run.returncode != 0 for run in done.values())
    for where, text in texts.items():
        if "REDIS_URL" not in where:
            assert "MEMSYNC_MAX_RETRIES" in text and "EMBEDDING_DIMENSIONS" in text, f"{where}: {text[-800:]}"
    assert leaks(texts) == []
    reliability_report(
        "secrets: start-up with bad settings",
        f"{len(texts)} outputs: worker, one-off, CLI; the secrets as bad values, a broken REDIS_URL",
        "start-up stops, naming the variable; no output holds a secret",
    )
