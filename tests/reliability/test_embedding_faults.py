"""Scenario 3: the embedding server fails, transiently or for good, under the Procfile worker.

Transient answers (429 with Retry-After, 500, a held connection that times out) on 30% of requests:
every sync ends applied, once, and no retry after a 429 comes sooner than its Retry-After. Permanent
answers (400, 401): one request, no retry, the message dead-lettered with a readable reason, nothing
written.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Final, cast

import dramatiq
import pytest
from dramatiq.results import ResultFailure

import actors
from actors import state
from actors.deadletter import DeadLetter
from tests.conftest import API_KEY
from tests.reliability.conftest import Report
from tests.reliability.invariants import Expectation, check_invariants
from tests.support.embedding_server import TIMEOUT, EmbeddingServer, RecordedRequest
from tests.support.worker import running_worker, wait_until

FAULT_RATE: Final = 0.3
RETRY_AFTER_S: Final = 1.0
#: 10 retries: at a 30% fault rate, 3 (the default) would dead-letter about 1% of the messages.
MAX_RETRIES: Final = 10
#: One process of 8 threads; backoffs stay the session's 50 ms doubling to 400 ms.
#: Coalescing off: one request per sync, so the faults fall on single messages as this scenario means.
#: Shared requests under faults are covered in tests/actors/test_coalescing.py.
WORKER_ENV: Final = {
    "MEMSYNC_MAX_RETRIES": str(MAX_RETRIES),
    "MEMSYNC_THREADS": "8",
    "MEMSYNC_COALESCE_MS": "0",
}
SYNCS: Final = 160
UPDATES: Final = SYNCS // 4
#: Serial syncs whose first two requests get a 429, for the Retry-After timing check.
TIMED_SYNCS: Final = 3
#: A retry later than Retry-After by more than this is too late (the delay is computed in ms, in-process).
LATE_S: Final = 3.0
RESULT_TIMEOUT_S: Final = 90.0

pytestmark = pytest.mark.usefixtures("empty_queues")


def sync(namespace: str, key: str, value: str) -> dramatiq.Message[Any]:
    message: dramatiq.Message[Any] = actors.memory_sync.send(
        key=key, value=value, embed=True, namespace=namespace
    )
    return message


def result_of(message: dramatiq.Message[Any]) -> dict[str, Any]:
    result: dict[str, Any] = message.get_result(block=True, timeout=int(RESULT_TIMEOUT_S * 1000))
    return result


def text_of(key: str, round_: int) -> str:
    return f"memory {key} written in round {round_}, about topic {key.split('-')[-1]}"


def synced_in_rounds(namespace: str, expected: Expectation) -> list[dict[str, Any]]:
    """SYNCS new keys, then UPDATES of some of them once the first round is applied."""
    keys = [f"fact-{n}" for n in range(SYNCS)]
    results: list[dict[str, Any]] = []
    for round_, batch in enumerate([keys, keys[:UPDATES]], start=1):
        messages = [sync(namespace, key, text_of(key, round_)) for key in batch]
        results += [result_of(message) for message in messages]
        for key in batch:
            expected.sync(key, text_of(key, round_))
    return results


def retry_gaps_after_429(requests: list[RecordedRequest]) -> list[float]:
    """Seconds from each 429 to the next request; only meaningful for one message in flight."""
    return [
        later.arrived_s - earlier.arrived_s
        for earlier, later in itertools.pairwise(requests)
        if earlier.status == 429
    ]


def timed_retry_gaps(server: EmbeddingServer, namespace: str, expected: Expectation) -> list[float]:
    """One sync at a time, each answered 429 (Retry-After 1 s) twice: the gaps before each retry."""
    server.set_fault_rate(0.0)
    gaps: list[float] = []
    for n in range(TIMED_SYNCS):
        key, value = f"timed-{n}", f"a memory that waited for the rate limit, number {n}"
        server.fail_next(429, 2, retry_after_s=RETRY_AFTER_S)
        seen = len(server.embedding_requests)
        assert result_of(sync(namespace, key, value))["status"] == "success"
        expected.sync(key, value)
        requests = server.embedding_requests[seen:]
        assert [r.status for r in requests] == [429, 429, 200], "one message in flight, two 429s, then 200"
        gaps += retry_gaps_after_429(requests)
    return gaps


def fault_counts(requests: list[RecordedRequest]) -> dict[str, int]:
    statuses = [r.status for r in requests]
    return {"429": statuses.count(429), "500": statuses.count(500), "timeout": statuses.count(None)}


@pytest.mark.timeout(150)
def test_every_sync_ends_applied_once_when_30_percent_of_embedding_requests_fail(
    embedding_service: EmbeddingServer, namespace: str, worker_logs: Path, reliability_report: Report
) -> None:
    embedding_service.set_fault_rate(FAULT_RATE, (429, 500, TIMEOUT), seed=3, retry_after_s=RETRY_AFTER_S)
    expected = Expectation(namespace)
    started = time.monotonic()
    with running_worker(WORKER_ENV, worker_logs / "worker.log"):
        results = synced_in_rounds(namespace, expected)
        under_load = embedding_service.embedding_requests
        gaps = timed_retry_gaps(embedding_service, namespace, expected)
    took_s = time.monotonic() - started

    faults = fault_counts(under_load)
    print(f"{len(under_load)} requests under load, faults {faults}; gaps after 429s {gaps}; {took_s:.1f} s")
    assert [r["status"] for r in results] == ["success"] * (SYNCS + UPDATES)
    assert all(faults.values()), f"every kind of fault was injected: {faults}"
    ok = [r for r in under_load if r.status == 200]
    # Concurrent syncs share requests: count inputs, not requests.
    assert sum(r.inputs for r in ok) == SYNCS + UPDATES, (
        "one successful embedding per sync: each applied once"
    )
    assert len(gaps) == 2 * TIMED_SYNCS
    assert all(RETRY_AFTER_S <= gap < RETRY_AFTER_S + LATE_S for gap in gaps), f"Retry-After: {gaps}"
    checked = check_invariants(state.runtime().memories, state.runtime().dead_letters, expected)
    reliability_report(
        "3. embedding faults, transient",
        f"{SYNCS} syncs + {UPDATES} updates; {len(under_load) - len(ok)} of {len(under_load)} requests "
        f"failed ({faults['429']} x 429 with Retry-After {RETRY_AFTER_S:g} s, {faults['500']} x 500, "
        f"{faults['timeout']} x 2 s timeout); then {TIMED_SYNCS} syncs one at a time, each 429'd twice; "
        f"1 worker process x 8 threads, MEMSYNC_MAX_RETRIES={MAX_RETRIES}, backoff 50-400 ms; {took_s:.0f} s",
        f"all applied once (results; one 200 per sync; invariants {checked}); every retry after a 429 "
        f"waited at least its Retry-After ({min(gaps):.2f} to {max(gaps):.2f} s)",
    )


def refused(
    server: EmbeddingServer, namespace: str, key: str, status: int
) -> tuple[DeadLetter, list[RecordedRequest]]:
    """Sync `key` while the server refuses the next request with `status`; its dead letter and requests."""
    dead_letters = state.runtime().dead_letters
    seen = len(server.embedding_requests)
    server.fail_next(status)
    message = sync(namespace, key, f"a memory the embedding server refuses with {status}")
    with pytest.raises(ResultFailure):
        result_of(message)
    letter = wait_until(lambda: dead_letters.get(message.message_id), 10, f"the dead letter of the {status}")
    time.sleep(1.0)  # longer than any backoff here: a retry, had there been one, would show by now
    return cast(DeadLetter, letter), server.embedding_requests[seen:]


@pytest.mark.timeout(90)
def test_a_permanent_embedding_answer_is_dead_lettered_at_once_with_nothing_written(
    embedding_service: EmbeddingServer, namespace: str, worker_logs: Path, reliability_report: Report
) -> None:
    expected = Expectation(namespace)
    kept = "a memory that stays as it was"
    with running_worker(WORKER_ENV, worker_logs / "worker.log"):
        assert result_of(sync(namespace, "kept", kept))["version"] == 1
        expected.sync("kept", kept)
        answers = {
            status: refused(embedding_service, namespace, key, status)
            for status, key in ((400, "never-written"), (401, "kept"))
        }

    for status, (letter, requests) in answers.items():
        assert [r.status for r in requests] == [status], f"{status}: exactly one request, no retry"
        assert (letter.retries, letter.error) == (0, "EmbeddingRejected")
        assert f"embedding server answered {status}: " in letter.reason, letter.reason
        assert API_KEY not in letter.reason and "SENTINEL" not in letter.reason
        expected.dead_message_ids.add(letter.message_id)
    store = state.runtime().store
    assert store.record("never-written", namespace=namespace) is None
    checked = check_invariants(state.runtime().memories, state.runtime().dead_letters, expected)
    reasons = "; ".join(letter.reason for letter, _ in answers.values())
    reliability_report(
        "3. embedding faults, permanent",
        "1 sync, then a new key answered 400 and an update answered 401; 1 worker process x 8 threads",
        f"one request each (no retry), dead-lettered with retries=0 and reasons '{reasons}', "
        f"nothing written (the update left v1 and its vector), invariants {checked}",
    )
