"""One-off runs: `python -m actors` with WORKER_JOB and WORKER_PAYLOAD, as a subprocess."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from actors.errors import redis_unreachable
from kvstore import MemoryStore
from tests.support.embedding_server import EmbeddingServer
from tests.support.services import free_port


def _run(job: str | None, payload: str | None, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_JOB", "WORKER_PAYLOAD")} | extra
    env.update(
        {
            name: value
            for name, value in (("WORKER_JOB", job), ("WORKER_PAYLOAD", payload))
            if value is not None
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "actors"], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.timeout(60)
def test_a_one_off_sync_prints_its_result_and_exits_zero(namespace: str, store: MemoryStore) -> None:
    done = _run("MEMORY_SYNC", json.dumps({"key": "test", "value": "data", "namespace": namespace}))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "status": "success", "key": "test", "version": 1, "namespace": namespace, "outcome": "applied"
    }  # fmt: skip
    assert store.get("test", namespace=namespace) == "data"


@pytest.mark.timeout(60)
def test_a_one_off_rollback_restores_the_previous_value(namespace: str, store: MemoryStore) -> None:
    store.set("test", "first", namespace=namespace)
    store.set("test", "second", namespace=namespace)
    done = _run("MEMORY_ROLLBACK", json.dumps({"key": "test", "namespace": namespace}))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "rolled_back"
    assert store.get("test", namespace=namespace) == "first"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("job", "payload", "problem"),
    [
        ("MEMORY_NOPE", '{"key": "k", "value": 1}', "WORKER_JOB='MEMORY_NOPE' is not a job"),
        (None, '{"key": "k", "value": 1}', "WORKER_JOB='' is not a job"),
        ("MEMORY_SYNC", None, "WORKER_PAYLOAD is not set"),
        ("MEMORY_SYNC", '{"key": "k", "value": ', "WORKER_PAYLOAD is not valid JSON"),
        ("MEMORY_SYNC", '{"key": "k", "value": NaN}', "NaN is not a JSON value"),
        ("MEMORY_SYNC", '["k", 1]', "must be a JSON object"),
        ("MEMORY_SYNC", '{"value": 1}', "key: Field required"),
        ("MEMORY_SYNC", '{"key": 7, "value": 1}', "key: Input should be a valid string"),
        ("MEMORY_SYNC", '{"key": "k", "value": 1, "embed": "yes"}', "embed: Input should be a valid boolean"),
        ("MEMORY_SYNC", '{"key": "k", "value": 1, "extra": true}', "extra: Extra inputs are not permitted"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line_naming_the_problem(
    job: str | None, payload: str | None, problem: str, store: MemoryStore
) -> None:
    before = _versions(store)
    done = _run(job, payload)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0], done.stderr
    assert _versions(store) == before  # none of these payloads names a namespace: they would write to default


def _versions(store: MemoryStore) -> dict[str, int]:
    """Each key of the default namespace, and its current version."""
    names = store.keys(namespace=None)
    return {key: record.version for key in names if (record := store.record(key)) is not None}


@pytest.mark.timeout(60)
def test_an_oversized_value_exits_non_zero_and_writes_nothing(namespace: str, store: MemoryStore) -> None:
    payload = json.dumps({"key": "big", "value": "x" * 2_000, "namespace": namespace})
    done = _run("MEMORY_SYNC", payload, MEMSYNC_MAX_VALUE_BYTES="1000")
    assert done.returncode == 2
    assert "limit is 1000" in done.stderr
    assert store.record("big", namespace=namespace) is None


@pytest.mark.timeout(60)
def test_a_one_off_run_that_runs_out_of_retries_leaves_nothing_half_applied(
    namespace: str, store: MemoryStore, embedding_service: EmbeddingServer
) -> None:
    from actors.oneoff import main

    store.set("k", "a cat", namespace=namespace, embed=True, content_hash="h1")
    store.set("k", "a dog", namespace=namespace, embed=True, content_hash="h2")
    embedding_service.fail_next(500, count=10)  # the rollback cannot embed "a cat" it would restore
    err = io.StringIO()
    payload = json.dumps({"key": "k", "namespace": namespace})
    assert main({"WORKER_JOB": "MEMORY_ROLLBACK", "WORKER_PAYLOAD": payload}, io.StringIO(), err) == 1
    assert "answered 500" in err.getvalue()
    record = store.record("k", namespace=namespace)
    assert record is not None and (record.value, record.version) == ("a dog", 2)
    # the first attempt and 3 retries, each refused before its write: nothing to undo
    assert len(embedding_service.embedding_requests) == 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("embed", [False, True])
def test_a_one_off_run_with_redis_down_says_so_in_one_line_without_the_password(embed: bool) -> None:
    port = free_port()
    payload = json.dumps({"key": "k", "value": "a memory", "embed": embed})
    done = _run("MEMORY_SYNC", payload, REDIS_URL=f"redis://:s3cret-pw@127.0.0.1:{port}/0")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: Redis is unreachable at 127.0.0.1:{port}; is REDIS_URL right, and is Redis running?"
    ]


def test_every_redis_is_unreachable_message_reads_the_same_and_suggests_up_without_a_url() -> None:
    assert redis_unreachable("redis://:pw@cache.example:6380/0", local=False) == (
        "Redis is unreachable at cache.example:6380; is REDIS_URL right, and is Redis running?"
    )
    assert redis_unreachable("redis://127.0.0.1:6479/0", local=True) == (
        "Redis is unreachable at 127.0.0.1:6479; start it with `memsync up`"
    )
