"""The Procfile worker's log: one line per message, never a value, and JSON lines on demand.

The real worker (`running_worker`, default INFO level) runs through a sync that fails transiently and
then is applied, one refused for good, one that runs out of retries, plain ones, a rollback and
batches (one of them retried); every value holds a marker that must never reach the log. A second run
with `MEMSYNC_LOG_FORMAT=json` checks that the worker processes write JSON objects.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import PriorityQueue
from typing import Any, Final

import dramatiq
import dramatiq.worker
import pytest
from dramatiq.errors import BrokerConnectionError
from dramatiq.results import ResultFailure

from actors import memory_rollback, memory_sync, memory_sync_batch, state
from actors.logs import KEY_SHOWN, JsonLines, describe
from tests.conftest import API_KEY
from tests.support.embedding_server import EmbeddingServer
from tests.support.results import WAIT_MS
from tests.support.worker import READY_LINE, print_logs, running_worker, signal_group, wait_until

BOOT_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 30.0
#: The fields after `actor[id]` on a message's line; a key is quoted and may hold spaces.
_FIELD: Final = re.compile(r"(\w+)=('[^']*'|\S+)")


@dataclass
class Run:
    """What one worker run was sent (message ids by step) and what it logged."""

    marker: str
    ids: dict[str, str] = field(default_factory=dict)
    log: str = ""

    def lines_of(self, step: str) -> list[str]:
        """The log lines that name the step's message as `actor[id]`."""
        return [line for line in self.log.splitlines() if f"[{self.ids[step]}]" in line]

    def fields_of(self, step: str) -> list[dict[str, str]]:
        """The `name=value` fields of each line of the step's message, in order."""
        return [
            dict(_FIELD.findall(line.partition(f"[{self.ids[step]}]")[2])) for line in self.lines_of(step)
        ]


def outcome(message: dramatiq.Message[Any]) -> Any:
    """The message's result, or its failure's text."""
    try:
        return message.get_result(block=True, timeout=WAIT_MS)
    except ResultFailure as failure:
        return str(failure)


def send_every_kind(run: Run, server: EmbeddingServer, namespace: str) -> None:
    """One message of each kind, one after another, each with the faults meant for it ready."""
    value, key = f"{run.marker} the user likes tea", f"pref-{run.marker[-4:]}"

    def sync(step: str, faults: list[int], **options: Any) -> Any:
        for status in faults:
            server.fail_next(status)
        kwargs = {"key": f"{key}-{step}", "value": value, "embed": True, "namespace": namespace}
        message = memory_sync.send_with_options(kwargs=kwargs, **options)
        run.ids[step] = message.message_id
        return outcome(message)

    assert sync("transient", [503])["outcome"] == "applied"
    assert "EmbeddingRejected" in sync("permanent", [400])
    assert "EmbeddingUnavailable" in sync("exhausted", [503, 503], max_retries=1)
    assert sync("applied", [])["version"] == 1
    assert sync("applied", [])["version"] == 2  # the same key and value again: a new version
    rollback = memory_rollback.send(key=f"{key}-applied", namespace=namespace)
    run.ids["rollback"] = rollback.message_id
    assert outcome(rollback)["status"] == "rolled_back"
    items = [
        {"key": f"{key}-batch-{n}", "value": {"note": value}, "embed": True, "namespace": namespace}
        for n in range(2)
    ]
    server.fail_next(503)
    batch = memory_sync_batch.send(items=items)
    run.ids["batch"] = batch.message_id
    assert outcome(batch)["counts"]["applied"] == 2


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddingServer]:
    """An embedding server of this module's own, for the workers it runs."""
    with EmbeddingServer(api_key=API_KEY) as own:
        yield own


def worker_run(server: EmbeddingServer, log: Path, env: dict[str, str] | None = None) -> Run:
    """The Procfile worker at its default level, with `env`, through every kind of message."""
    state.broker().flush_all()  # nothing left over from another test to run (and log) here
    run, namespace = Run(marker=f"VALUE-MARKER-{uuid.uuid4().hex}"), f"ns-{uuid.uuid4().hex[:12]}"
    with running_worker({"OPENAI_BASE_URL": server.base_url, **(env or {})}, log) as worker:
        wait_until(
            lambda: READY_LINE in log.read_text(errors="replace"), BOOT_TIMEOUT_S, "the worker to boot"
        )
        send_every_kind(run, server, namespace)
        signal_group(worker, signal.SIGTERM)  # as a PaaS stops it: the stop is logged too
        wait_until(lambda: worker.poll() is not None, STOP_TIMEOUT_S, "the worker to stop")
    run.log = log.read_text(errors="replace")
    print_logs(log.parent)
    return run


@pytest.fixture(scope="module")
def text_run(server: EmbeddingServer, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return worker_run(server, tmp_path_factory.mktemp("text-worker") / "worker.log")


def test_no_value_reaches_the_workers_log(text_run: Run) -> None:
    assert "outcome=retrying" in text_run.log and "outcome=failed" in text_run.log, (
        "the faults did not happen"
    )
    assert text_run.marker not in text_run.log
    assert "value=" not in text_run.log and "Failed to process message" not in text_run.log


def test_each_message_logs_one_line_per_attempt_naming_its_id_key_attempt_outcome_and_ms(
    text_run: Run,
) -> None:
    def summary(step: str) -> list[tuple[str | None, ...]]:
        return [
            (f.get("attempt"), f.get("outcome"), f.get("version"), f.get("error"))
            for f in text_run.fields_of(step)
        ]

    assert summary("transient") == [
        ("1", "retrying", None, "EmbeddingUnavailable"),
        ("2", "applied", "1", None),
    ]
    assert summary("permanent") == [("1", "failed", None, "EmbeddingRejected")]
    assert summary("exhausted") == [
        ("1", "retrying", None, "EmbeddingUnavailable"),
        ("2", "failed", None, "EmbeddingUnavailable"),
    ]
    assert summary("rollback") == [("1", "applied", "3", None)]
    for step in ("transient", "permanent", "exhausted", "rollback"):
        actor = "memory_rollback" if step == "rollback" else "memory_sync"
        assert all(f"{actor}[{text_run.ids[step]}] key='pref-" in line for line in text_run.lines_of(step))
        assert all(re.fullmatch(r"\d+", fields.get("ms", "")) for fields in text_run.fields_of(step)), step
    assert [f.get("delay_ms") is not None for f in text_run.fields_of("transient")] == [True, False]
    batch = text_run.fields_of("batch")
    assert [(f.get("attempt"), f.get("outcome"), f.get("items"), f.get("outcomes")) for f in batch] == [
        ("1", "retrying", None, None),
        ("2", None, "2", "applied:2"),
    ]


def test_a_failure_logs_no_traceback(text_run: Run) -> None:
    assert "Traceback" not in text_run.log
    assert len(text_run.lines_of("permanent")) == 1


# --- JSON lines ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def json_log(server: EmbeddingServer, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The lines of a worker run like `text_run`, with MEMSYNC_LOG_FORMAT=json."""
    log = tmp_path_factory.mktemp("json-worker") / "worker.log"
    return worker_run(server, log, {"MEMSYNC_LOG_FORMAT": "json"}).log.splitlines()


def _json_object(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def test_json_format_makes_every_line_of_the_worker_processes_a_json_object(json_log: list[str]) -> None:
    objects = [_json_object(line) for line in json_log]
    text = [line for line, parsed in zip(json_log, objects, strict=True) if parsed is None]
    # Dramatiq's main process sets up its logging before memsync loads: its few lines stay text.
    assert text and all("[dramatiq.MainProcess]" in line for line in text), text
    parsed = [line for line in objects if line is not None]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in parsed)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]) for line in parsed)
    messages = [line["message"] for line in parsed]
    assert READY_LINE in messages
    assert any("outcome=retrying" in message for message in messages)
    assert any(
        "outcome=failed" in message and line["level"] == "ERROR"
        for line, message in zip(parsed, messages, strict=True)
    )
    assert any(
        re.search(r"memory_sync\[[^\]]+\] key='pref-[^']*' attempt=2 version=1 outcome=applied ms=\d+", m)
        for m in messages
    )


def test_a_json_line_carries_utc_milliseconds_and_an_errors_type_never_its_text() -> None:
    try:
        raise ValueError("VALUE-MARKER in an error")
    except ValueError:
        record = logging.LogRecord(
            "memsync.retry", logging.ERROR, __file__, 1, "failed %s", ("k",), sys.exc_info()
        )
    record.created, record.msecs = 86_400.25, 250.0
    line = json.loads(JsonLines().format(record))
    assert {name: line[name] for name in ("time", "level", "logger", "message", "error")} == {
        "time": "1970-01-02T00:00:00.250Z",
        "level": "ERROR",
        "logger": "memsync.retry",
        "message": "failed k",
        "error": "ValueError",
    }
    assert "VALUE-MARKER" not in json.dumps(line)


# --- what Dramatiq itself logs about a message ---------------------------------------------------


class _AckFailsOnce:
    """A consumer whose first acknowledgement meets a connection error, as when Redis is restarting."""

    def __init__(self) -> None:
        self.acked: list[str] = []

    def ack(self, message: dramatiq.MessageProxy) -> None:
        if not self.acked:
            self.acked.append("refused")
            raise BrokerConnectionError("Redis is restarting")  # type: ignore[no-untyped-call]
        self.acked.append(message.message_id)


def test_an_acknowledgement_that_meets_a_connection_error_is_logged_without_the_value(
    worker: dramatiq.Worker, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dramatiq logs the message, arguments and all, while it tries an ack again; by its id here."""
    queue = state.settings().queue
    live = worker.consumers[queue]
    wait_until(lambda: live.consumer is not None, 10, "the worker's consumer to boot")
    monkeypatch.setattr(dramatiq.worker, "POST_PROCESS_MESSAGE_RETRY_DELAY_SECS", 0)
    # A consumer thread of the same queue logs through the same logger as the worker's own.
    thread = dramatiq.worker.ConsumerThread(
        broker=state.broker(), queue_name=queue, prefetch=1, work_queue=PriorityQueue(), worker_timeout=100
    )
    thread.consumer = consumer = _AckFailsOnce()  # type: ignore[assignment]
    message = memory_sync.message(key="k", value="VALUE-MARKER in an ack")
    caplog.set_level(logging.INFO)
    thread.post_process_message(dramatiq.MessageProxy(message))
    assert consumer.acked == ["refused", message.message_id]
    assert f"Failed to post_process_message(memory_sync[{message.message_id}])" in caplog.text
    assert "VALUE-MARKER" not in caplog.text


def test_a_line_shows_the_start_of_a_long_key_and_all_of_a_short_one() -> None:
    long_key, short_key = "k" * 512, "user-42:prefs"
    long_line = describe(memory_sync.message(key=long_key, value="v"))
    assert f"key='{'k' * KEY_SHOWN}'..." in long_line and long_key not in long_line
    assert f"key='{short_key}'" in describe(memory_sync.message(key=short_key, value="v"))
