"""The RabbitMQ pass: the actor tests and the kill scenarios again, with the actors on RabbitMQ.

`actors` builds its broker once per process from the environment, so the pass is a pytest of its
own: `BROKER_URL` names the RabbitMQ of this machine (`MEMSYNC_TEST_RABBITMQ_URL` to point
elsewhere), `MEMSYNC_QUEUE` a queue of the pass's own, deleted after it. It shares this run's Redis,
under a key prefix of its own. Its reliability rows join this run's table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.reliability.conftest import Report
from tests.support.brokers import RABBITMQ_URL, RabbitQueues, on_rabbitmq, rabbitmq_answers
from tests.support.worker import PROJECT_ROOT

#: What runs on RabbitMQ: the actor tests, and scenario 1 and 1b with the kill inside the index step.
TARGETS = ("tests/actors", "tests/reliability/test_kills.py")
#: Actor tests that send nothing through the broker, build brokers of their own whatever the setting, or
#: test what does not depend on the broker (kept out to hold the suite near 10 minutes).
NOT_ON_THE_BROKER = (
    "tests/actors/test_local_stack.py",  # `memsync up`: its own Redis and worker
    "tests/actors/test_oneoff.py",  # one-off runs apply in their own process
    "tests/actors/test_reindex_cli.py",  # `memsync reindex` runs in the command
    "tests/actors/test_indexes.py",  # the active index record
    "tests/actors/test_queues.py",  # a Redis broker and a RabbitMQ broker of its own
    "tests/actors/test_logs.py",  # the worker's log lines, whatever carries its messages
    "tests/actors/test_metrics.py",  # the metrics port, whatever carries the messages
)
PASS_TIMEOUT_S = 1_080
_TAIL_LINES = 150


def _require_rabbitmq() -> None:
    if rabbitmq_answers():
        return
    reason = "no RabbitMQ answers at MEMSYNC_TEST_RABBITMQ_URL (default amqp://127.0.0.1:5672)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the RabbitMQ pass")
    pytest.skip(reason)


def _reliability_rows(output: str) -> list[list[str]]:
    """The rows of the pass's reliability table, each [scenario, size, checked, result]."""
    rows = [line.strip("| ").split(" | ") for line in output.splitlines() if line.startswith("| ")]
    return [row for row in rows if len(row) == 4 and row[0] not in ("scenario", "---")]


@pytest.mark.timeout(PASS_TIMEOUT_S + 60)
@pytest.mark.skipif(on_rabbitmq(), reason="this run is the RabbitMQ pass already")
def test_the_actor_tests_and_the_kill_scenarios_pass_with_the_actors_on_rabbitmq(
    tmp_path: Path, reliability_report: Report
) -> None:
    _require_rabbitmq()
    queue = f"mstest-{uuid.uuid4().hex[:12]}"
    env = {**os.environ, "BROKER_URL": RABBITMQ_URL, "MEMSYNC_QUEUE": queue}
    env.pop("PYTEST_ADDOPTS", None)
    log = tmp_path / "rabbitmq-pass.log"
    ignored = [f"--ignore={path}" for path in NOT_ON_THE_BROKER]
    command = [sys.executable, "-m", "pytest", *TARGETS, *ignored, "-p", "no:cacheprovider", "-q", "-rfEs"]
    started = time.monotonic()
    try:
        with log.open("wb") as out:
            finished = subprocess.run(
                command,
                cwd=PROJECT_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=PASS_TIMEOUT_S,
            )
    finally:
        queues = RabbitQueues(queue, RABBITMQ_URL)
        queues.delete()
        queues.close()
    elapsed_s = time.monotonic() - started

    output = log.read_text(errors="replace")
    print(f"the RabbitMQ pass took {elapsed_s:.0f} s; its last lines:")
    print("\n".join(output.splitlines()[-_TAIL_LINES:]))
    assert finished.returncode == 0, f"the RabbitMQ pass failed: {output.splitlines()[-1]}"
    for scenario, size, checked, _ in _reliability_rows(output):
        reliability_report(scenario, size, checked)
