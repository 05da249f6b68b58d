"""Scenario 5: the Chroma server goes down mid-load under the Procfile worker, then comes back.

The test runs a `chroma run` of its own and points the worker's CHROMA_URL at it. Once a third of
the syncs are applied, Chroma is stopped; while it is down, `search()` fails with IndexUnavailable
(never with wrong or partial results), and syncs retry. Chroma then starts again on the same port and
directory, and every sync must converge: Redis as expected, the index in step with it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import dramatiq
import pytest

import actors
from actors import state
from actors.runtime import make_embedder
from tests.reliability.conftest import Report
from tests.reliability.invariants import Expectation, check_invariants
from tests.support.embedding_server import EmbeddingServer
from tests.support.services import Service, start_chroma
from tests.support.worker import running_worker, wait_until
from vectorstore import IndexUnavailable, Memories, VectorIndex, chroma_client

SYNCS: Final = 240
EMBEDDING_LATENCY_MS: Final = 40
#: How long Chroma stays down before it is started again (its start adds a few seconds more).
CHROMA_DOWN_S: Final = 6.0
#: 30 retries, backoff 50 ms doubling to 1 s: ~27 s of backoff, longer than the outage.
WORKER_ENV: Final = {"MEMSYNC_THREADS": "4", "MEMSYNC_MAX_RETRIES": "30", "MEMSYNC_MAX_BACKOFF_MS": "1000"}
CONVERGE_TIMEOUT_S: Final = 60.0
QUERY: Final = "memory about subject 3"

pytestmark = pytest.mark.usefixtures("empty_queues")


@dataclass
class OwnChroma:
    """A `chroma run` of this test's own, restartable on the same port and directory."""

    directory: Path
    service: Service

    @property
    def url(self) -> str:
        return self.service.url

    def stop(self) -> None:
        self.service.stop()

    def start_again(self) -> None:
        port = int(self.url.rsplit(":", 1)[1])
        self.service = start_chroma(self.directory, port)


@pytest.fixture
def own_chroma(tmp_path: Path) -> Iterator[OwnChroma]:
    own = OwnChroma(tmp_path / "chroma", start_chroma(tmp_path / "chroma"))
    yield own
    own.stop()


def memories_on(chroma_url: str) -> Memories:
    """The worker's Memories as it builds them (actors/runtime.py), on this test's Chroma."""
    s = state.settings()
    embedder = make_embedder(s)
    index = VectorIndex(
        chroma_client(chroma_url), model=embedder.model, dimensions=embedder.dimensions, prefix=s.prefix
    )
    return Memories(state.runtime().store, index, embedder)


def text_of(n: int) -> str:
    return f"memory number {n}, about subject {n % 11}"


def sync(namespace: str, n: int, expected: Expectation) -> dramatiq.Message[Any]:
    message: dramatiq.Message[Any] = actors.memory_sync.send(
        key=f"fact-{n}", value=text_of(n), embed=True, namespace=namespace
    )
    expected.sync(f"fact-{n}", text_of(n))
    return message


def applied(memories: Memories, namespace: str) -> int:
    return len(memories.store.keys(namespace=namespace))


def search_errors_while_down(memories: Memories, namespace: str, tries: int) -> list[str]:
    """Search `tries` times while Chroma is down; the error of each (each must be IndexUnavailable)."""
    errors = []
    for _ in range(tries):
        with pytest.raises(IndexUnavailable) as raised:
            memories.search(QUERY, k=5, namespace=namespace)
        errors.append(str(raised.value))
        time.sleep(CHROMA_DOWN_S / tries)
    return errors


def retried_for_chroma(log: Path) -> int:
    lines = log.read_text(errors="replace").splitlines()
    return sum("outcome=retrying" in line and "error=IndexUnavailable" in line for line in lines)


def current_hits(memories: Memories, namespace: str, expected: Expectation) -> list[str]:
    """Search; every hit must be its key's current value (the index may still lag behind Redis)."""
    hits = memories.search(QUERY, k=5, namespace=namespace)
    for hit in hits:
        want = expected.keys[hit.key]
        assert (hit.value, hit.version) == (want.value, want.version), f"a wrong search result: {hit}"
    return [hit.key for hit in hits]


@pytest.mark.timeout(150)
def test_syncs_converge_and_search_fails_clearly_while_chroma_is_down(
    embedding_service: EmbeddingServer,
    own_chroma: OwnChroma,
    namespace: str,
    worker_logs: Path,
    reliability_report: Report,
) -> None:
    embedding_service.latency_ms = EMBEDDING_LATENCY_MS
    expected, log = Expectation(namespace), worker_logs / "worker.log"
    memories = memories_on(own_chroma.url)
    started = time.monotonic()
    with running_worker({**WORKER_ENV, "CHROMA_URL": own_chroma.url}, log):
        messages = [sync(namespace, n, expected) for n in range(SYNCS)]
        wait_until(lambda: applied(memories, namespace) >= SYNCS // 3, 60, "a third of the syncs to apply")
        own_chroma.stop()
        down_at, applied_at_stop = time.monotonic(), applied(memories, namespace)
        errors = search_errors_while_down(memories, namespace, tries=3)
        own_chroma.start_again()
        down_s = time.monotonic() - down_at
        current_hits(memories, namespace, expected)  # mid-recovery: maybe fewer hits, never wrong ones
        results = [m.get_result(block=True, timeout=int(CONVERGE_TIMEOUT_S * 1000)) for m in messages]
    took_s = time.monotonic() - started

    retried = retried_for_chroma(log)
    print(f"applied at the stop {applied_at_stop}; down {down_s:.1f} s; {retried} retries; errors {errors}")
    assert [r["status"] for r in results] == ["success"] * SYNCS
    assert all(error.startswith("Chroma failed: ") for error in errors), errors
    assert retried > 0, "no sync met the outage: the scenario proved nothing"
    checked = check_invariants(memories, state.runtime().dead_letters, expected)
    found = current_hits(memories, namespace, expected)
    assert len(found) == 5
    reliability_report(
        "5. Chroma outage mid-load",
        f"{SYNCS} syncs; `chroma run` stopped after {applied_at_stop} applied, down {down_s:.1f} s (start "
        f"included), started again on the same port and directory; 1 worker process x 4 threads, "
        f"MEMSYNC_MAX_RETRIES=30, backoff 50-1000 ms; {took_s:.0f} s",
        f"{retried} retries for IndexUnavailable, then all applied (results, invariants {checked}); "
        f"search() while down raised IndexUnavailable ('{errors[0][:80]}') {len(errors)} times out of "
        f"{len(errors)}; right after the restart and once converged, only current hits ({found})",
    )
