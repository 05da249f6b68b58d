"""Prometheus metrics: the real Procfile worker serves memsync's series beside Dramatiq's, scraped over HTTP.

Also the series themselves, recorded into a registry of their own from real Dramatiq messages.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq.results import ResultFailure
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import actors
from actors import metrics, state
from actors.batch import DONE_OPTION
from actors.metrics import Metrics
from settings import Settings, SettingsError, load_settings
from tests.support.embedding_server import EmbeddingServer, tokens
from tests.support.worker import running_worker, wait_until
from vectorstore import NO_OBSERVER, EmbeddingRejected, EmbeddingUnavailable

RESULT_TIMEOUT_MS = 60_000
SCRAPE_TIMEOUT_S = 30.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def metrics_port() -> Iterator[int]:
    """A free port for the worker's metrics; the directory its processes write is removed afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    yield port
    shutil.rmtree(metrics.metrics_dir(port), ignore_errors=True)


def scrape(port: int) -> str | None:
    """The worker's exposition, or None while nothing answers on the port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            text: str = response.read().decode()
            return text
    except (urllib.error.URLError, ConnectionError):
        return None


def samples(text: str) -> Samples:
    """Every sample of an exposition by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in found.items() if n == name and wanted <= have)


def result_of(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = message.get_result(block=True, timeout=RESULT_TIMEOUT_MS)
    return result


def failure_of(message: Any) -> str:
    with pytest.raises(ResultFailure) as failed:
        message.get_result(block=True, timeout=RESULT_TIMEOUT_MS)
    return str(failed.value)


@pytest.mark.timeout(120)
def test_the_procfile_worker_serves_memsyncs_series_and_dramatiqs_on_its_metrics_port(
    embedding_service: EmbeddingServer, namespace: str, worker_logs: Path, metrics_port: int
) -> None:
    key, other = f"pref-{uuid.uuid4().hex}", f"note-{uuid.uuid4().hex}"
    memory = f"the user's favourite colour is {uuid.uuid4().hex}"
    env = {
        "MEMSYNC_METRICS_PORT": str(metrics_port),
        "MEMSYNC_METRICS_HOST": "127.0.0.1",
        "MEMSYNC_PROCESSES": "2",  # two worker processes, summed by the main process's server
    }
    sync, batch = actors.memory_sync, actors.memory_sync_batch
    state.broker().flush_all()  # no message left over from an earlier test, so counts are exact
    with running_worker(env, worker_logs / "worker.log"):
        assert result_of(sync.send(key=key, value=memory, embed=True, namespace=namespace))["version"] == 1
        assert result_of(sync.send(key=key, value=memory, embed=True, namespace=namespace))["version"] == 2
        again = [{"key": key, "value": memory, "embed": True, "namespace": namespace}]
        assert result_of(batch.send(items=again, skip_unchanged=True))["counts"]["unchanged"] == 1
        assert "InvalidValue" in failure_of(
            sync.send(key=other, value="   ", embed=True, namespace=namespace)
        )
        embedding_service.fail_next(400)
        assert "EmbeddingRejected" in failure_of(
            sync.send(key=other, value="a text the server refuses", embed=True, namespace=namespace)
        )
        rolled_back = result_of(actors.memory_rollback.send(key=key, namespace=namespace))
        assert (rolled_back["status"], rolled_back["version"]) == ("rolled_back", 3)

        def counted() -> Samples:  # the counts land just after each result is stored
            text = scrape(metrics_port)
            found = samples(text) if text else {}
            return found if value(found, "dramatiq_messages_total") == 6 else {}

        found = wait_until(counted, SCRAPE_TIMEOUT_S, "the six messages counted on the metrics port")
        text = scrape(metrics_port) or ""

    syncs = {o: value(found, "memsync_syncs_total", outcome=o) for o in metrics.SYNC_OUTCOMES}
    assert syncs == {"applied": 2, "duplicate": 0, "stale": 0, "unchanged": 1, "failed": 2}
    rollbacks = {o: value(found, "memsync_rollbacks_total", outcome=o) for o in metrics.ROLLBACK_OUTCOMES}
    assert rollbacks == {"applied": 1, "duplicate": 0, "stale": 0, "failed": 0}
    assert value(found, "memsync_send_to_applied_milliseconds_count") == 2
    requests = {
        result: value(found, "memsync_embedding_requests_total", embedder="openai", result=result)
        for result in ("ok", "rejected", "unavailable")
    }
    assert requests == {"ok": 1, "rejected": 1, "unavailable": 0}
    assert value(found, "memsync_embedding_inputs_total", embedder="openai") == 1
    assert value(found, "memsync_embedding_tokens_total", embedder="openai") == len(tokens(memory))
    assert value(found, "memsync_embeddings_skipped_total") == 2  # the re-send, and the batch's check
    assert value(found, "dramatiq_messages_total", actor_name="memory_sync") == 4
    assert value(found, "dramatiq_message_errors_total", actor_name="memory_sync") == 2
    for private in (memory, key, other, namespace):
        assert private not in text


@pytest.mark.timeout(90)
def test_a_taken_metrics_port_is_one_log_line_and_the_worker_goes_on(
    embedding_service: EmbeddingServer, namespace: str, worker_logs: Path, metrics_port: int
) -> None:
    log = worker_logs / "worker.log"
    env = {"MEMSYNC_METRICS_PORT": str(metrics_port), "MEMSYNC_METRICS_HOST": "127.0.0.1"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", metrics_port))
        taken.listen()
        with running_worker(env, log):
            message = actors.memory_sync.send(
                key="pref", value="a dark theme", embed=True, namespace=namespace
            )
            assert result_of(message)["version"] == 1
            wait_until(lambda: "cannot serve metrics on" in log.read_text(), 30, "the metrics port's error")
    lines = [line for line in log.read_text().splitlines() if "cannot serve metrics on" in line]
    assert len(lines) == 1
    assert f"127.0.0.1:{metrics_port}" in lines[0]
    assert "Traceback" not in log.read_text()


def test_value_files_of_processes_that_ended_are_forgotten_and_live_ones_kept(tmp_path: Path) -> None:
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    dead, alive = int(ended.stdout), os.getpid()
    names = [f"counter_{dead}.db", f"histogram_{dead}.db", f"counter_{alive}.db", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    metrics.forget_dead_processes(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"counter_{alive}.db", "notes.txt"]


@pytest.mark.parametrize(
    ("variable", "bad"),
    [("MEMSYNC_METRICS_PORT", "70000"), ("MEMSYNC_METRICS_PORT", "nine"), ("MEMSYNC_METRICS_HOST", "a host")],
)
def test_a_bad_metrics_setting_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, bad: str
) -> None:
    monkeypatch.setenv(variable, bad)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert variable in str(refused.value)
    assert "\n" not in str(refused.value)


def test_metrics_are_off_without_a_port() -> None:
    assert metrics.middleware(Settings()) == []
    assert metrics.observer(Settings()) is NO_OBSERVER


def message(actor_name: str, **options: Any) -> dramatiq.Message[Any]:
    items = [{"key": f"k{n}", "value": n} for n in range(4)]
    kwargs = {"items": items} if actor_name == "memory_sync_batch" else {"key": "k", "value": 1}
    return dramatiq.Message(
        queue_name="memsync", actor_name=actor_name, args=(), kwargs=kwargs, options=options
    )


def test_a_batch_that_failed_for_good_counts_its_finished_items_and_the_rest_as_failed() -> None:
    series = Metrics(CollectorRegistry())
    done = {
        "0": {"status": "success", "outcome": "applied"},
        "1": {"status": "failed", "error": "InvalidValue: ..."},
    }
    series.message_finished(message("memory_sync_batch", **{DONE_OPTION: done}), None, failed=True)
    assert _counts(series, "memsync_syncs_total") == {"applied": 1, "failed": 3}
    assert _sample(series, "memsync_send_to_applied_milliseconds_count") == 1


def test_a_batch_counts_each_items_outcome() -> None:
    series = Metrics(CollectorRegistry())
    result = {"counts": {"applied": 2, "unchanged": 1, "duplicate": 0, "stale": 1, "failed": 1}}
    series.message_finished(message("memory_sync_batch"), result, failed=False)
    assert _counts(series, "memsync_syncs_total") == {"applied": 2, "unchanged": 1, "stale": 1, "failed": 1}
    assert _sample(series, "memsync_send_to_applied_milliseconds_count") == 2


def test_a_rollback_counts_apart_from_syncs_and_other_actors_not_at_all() -> None:
    series = Metrics(CollectorRegistry())
    series.message_finished(message("memory_rollback"), {"outcome": "applied"}, failed=False)
    series.message_finished(message("memory_rollback"), None, failed=True)
    series.message_finished(message("some_other_actor"), {"outcome": "applied"}, failed=False)
    assert _counts(series, "memsync_rollbacks_total") == {"applied": 1, "failed": 1}
    assert _counts(series, "memsync_syncs_total") == {}
    assert _sample(series, "memsync_send_to_applied_milliseconds_count") == 0


def test_embedding_requests_count_by_result_and_only_answered_ones_count_inputs() -> None:
    series = Metrics(CollectorRegistry())
    series.embedding_request("openai", 3, 12)
    series.embedding_request("openai", 2, None, EmbeddingUnavailable("embedding server answered 503"))
    series.embedding_request(
        "openai", 1, None, EmbeddingRejected("embedding server answered 400", status=400)
    )
    series.embedding_request("local", 5, None)
    for embedder, result in [
        ("openai", "ok"),
        ("openai", "unavailable"),
        ("openai", "rejected"),
        ("local", "ok"),
    ]:
        assert _sample(series, "memsync_embedding_requests_total", embedder=embedder, result=result) == 1
    assert _sample(series, "memsync_embedding_requests_total", embedder="local", result="rejected") is None
    assert _sample(series, "memsync_embedding_inputs_total", embedder="openai") == 3
    assert _sample(series, "memsync_embedding_inputs_total", embedder="local") == 5
    assert _sample(series, "memsync_embedding_tokens_total", embedder="openai") == 12
    assert _sample(series, "memsync_embedding_tokens_total", embedder="local") is None


def _sample(series: Metrics, name: str, **labels: str) -> float | None:
    registry: CollectorRegistry = series.registry
    return registry.get_sample_value(name, labels)


def _counts(series: Metrics, name: str) -> dict[str, float]:
    found = {}
    for outcome in metrics.SYNC_OUTCOMES:
        count = _sample(series, name, outcome=outcome)
        if count:
            found[outcome] = count
    return found
