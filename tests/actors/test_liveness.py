"""Worker liveness: each worker process beats in the store's Redis, whichever broker carries its messages."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import dramatiq
import pytest
import redis

from actors import state
from actors.cli import main
from actors.liveness import live_workers
from actors.transfer import workers_alive
from tests.support.worker import group_members, running_worker, signal_group, wait_until

#: A short heartbeat timeout for the workers started here, and for reading their beats.
TIMEOUT_MS = 1_000
FAST_BEAT = {"MEMSYNC_HEARTBEAT_TIMEOUT_MS": str(TIMEOUT_MS)}


def _alive(timeout_ms: int | None = None) -> list[str]:
    runtime = state.runtime()
    return live_workers(
        runtime.redis, runtime.keys.workers(), timeout_ms or runtime.settings.heartbeat_timeout_ms
    )


def _beat_of(client: redis.Redis, worker_id: str) -> float | None:
    score = client.zscore(state.runtime().keys.workers(), worker_id)
    return None if score is None else float(score)


def _other_process(ids: list[str]) -> list[str]:
    return [worker_id for worker_id in ids if worker_id.split(":")[-2] != str(os.getpid())]


def test_an_in_process_worker_is_alive_from_its_boot_until_it_stops() -> None:
    before = set(_alive())
    worker = dramatiq.Worker(state.broker(), worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        (worker_id,) = set(_alive()) - before
    finally:
        worker.stop()
    assert worker_id.split(":")[-2] == str(os.getpid())
    assert worker_id not in _alive()


@pytest.mark.timeout(90)
def test_a_worker_process_stopped_by_sigterm_takes_its_heartbeat_out_at_once(
    redis_client: redis.Redis, worker_logs: Path
) -> None:
    earlier = set(_alive())
    with running_worker(FAST_BEAT, worker_logs / "worker.log") as worker:
        (worker_id,) = wait_until(
            lambda: _other_process(sorted(set(_alive()) - earlier)), 60, "its first beat"
        )
        signal_group(worker, signal.SIGTERM)
        wait_until(lambda: not group_members(worker.pid), 30, "the worker to exit")
    assert _beat_of(redis_client, worker_id) is None


@pytest.mark.timeout(90)
def test_a_killed_worker_process_counts_as_alive_only_until_the_heartbeat_timeout(
    redis_client: redis.Redis, worker_logs: Path
) -> None:
    earlier = set(_alive())
    with running_worker(FAST_BEAT, worker_logs / "worker.log") as worker:
        (worker_id,) = wait_until(
            lambda: _other_process(sorted(set(_alive()) - earlier)), 60, "its first beat"
        )
        signal_group(worker, signal.SIGKILL)
    last_beat = _beat_of(redis_client, worker_id)
    wait_until(lambda: worker_id not in _alive(TIMEOUT_MS), 30, "the killed worker to age out")
    assert _beat_of(redis_client, worker_id) == last_beat, "the entry stays, only too old to count"


def test_an_import_through_the_workers_is_refused_while_no_worker_is_alive(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    wait_until(lambda: workers_alive(state.runtime()) == 0, 30, "no live worker (killed ones age out)")
    source = tmp_path / "in.jsonl"
    source.write_text('{"key": "k", "value": "v"}\n')
    assert main(["import", str(source)]) == 1
    assert "no worker is running" in capsys.readouterr().err
