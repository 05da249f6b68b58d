"""`memsync import`, `export` and `migrate-index` through the CLI entry point, on the test services."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import dramatiq
import numpy as np
import pytest

from actors import state
from actors.cli import main
from kvstore import KeyRef
from tests.support.embedding_server import EmbeddingServer, vector_for
from vectorstore import IndexEntry, VectorIndex
from vectorstore.index import collection_name


def _write_lines(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _memories(namespace: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "key": f"m{n}",
            "value": f"memory {n} about topic {n % 7}",
            "embed": n % 3 != 0,
            "namespace": namespace,
        }
        for n in range(count)
    ]


def _run_json(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> Any:
    capsys.readouterr()
    assert main([*argv, "--json"]) == code
    return json.loads(capsys.readouterr().out)


def test_an_import_through_the_workers_applies_every_valid_line_and_names_the_bad_ones(
    worker: dramatiq.Worker,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    namespace: str,
    embedding_service: EmbeddingServer,
) -> None:
    rows: list[Any] = [*_memories(namespace, 30), "not json", {"key": "", "value": 1, "namespace": namespace}]
    source = _write_lines(tmp_path / "in.jsonl", rows)
    embedding_service.clear_log()
    summary = _run_json(capsys, ["import", str(source), "--batch-size", "10"], code=1)
    assert {k: summary[k] for k in ("applied", "unchanged", "stale", "failed")} == {
        "applied": 30, "unchanged": 0, "stale": 0, "failed": 2,
    }  # fmt: skip
    assert [failure.split(":")[0] for failure in summary["failures"]] == ["line 31", "line 32"]
    assert "not JSON" in summary["failures"][0] and "key is empty" in summary["failures"][1]
    store = state.runtime().store
    assert store.get("m4", namespace=namespace) == "memory 4 about topic 4"
    # Three batches of ten, each at most one embedding request: not one request per memory.
    assert len(embedding_service.embedding_requests) <= 3
    assert sum(r.inputs for r in embedding_service.embedding_requests) == 20


def test_an_interrupted_import_run_again_applies_nothing_twice(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, namespace: str, embedding_service: EmbeddingServer
) -> None:
    rows = _memories(namespace, 40)
    _run_json(capsys, ["import", str(_write_lines(tmp_path / "half.jsonl", rows[:25])), "--in-process"])
    embedding_service.clear_log()
    summary = _run_json(capsys, ["import", str(_write_lines(tmp_path / "all.jsonl", rows)), "--in-process"])
    assert (summary["applied"], summary["unchanged"], summary["failed"]) == (15, 25, 0)
    assert sum(r.inputs for r in embedding_service.embedding_requests) == 10  # only the 15 new, 10 embedded
    store = state.runtime().store
    assert {store.record(f"m{n}", namespace=namespace).version for n in range(40)} == {1}  # type: ignore[union-attr]


def test_export_writes_what_import_reads_back_unchanged(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, namespace: str
) -> None:
    source = _write_lines(tmp_path / "in.jsonl", _memories(namespace, 12))
    _run_json(capsys, ["import", str(source), "--in-process"])
    exported = tmp_path / "out.jsonl"
    assert main(["export", "--namespace", namespace, "-o", str(exported)]) == 0
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert sorted(lines, key=lambda row: row["key"]) == sorted(
        _memories(namespace, 12), key=lambda r: r["key"]
    )
    summary = _run_json(capsys, ["import", str(exported), "--in-process"])
    assert (summary["applied"], summary["unchanged"]) == (0, 12)


def test_an_import_reads_standard_input_for_a_dash(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, namespace: str
) -> None:
    text = "".join(json.dumps(row) + "\n" for row in _memories(namespace, 3))
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    summary = _run_json(capsys, ["import", "-", "--in-process"])
    assert summary["applied"] == 3


def test_an_import_refuses_a_batch_size_past_the_limit(tmp_path: Path) -> None:
    source = _write_lines(tmp_path / "in.jsonl", [])
    assert main(["import", str(source), "--batch-size", "5000", "--in-process"]) == 2


def test_per_namespace_collections_are_carried_into_the_shards(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    memories = state.runtime().memories
    index = memories.index
    for n, text in enumerate(["a black cat", "a stock trader"]):
        memories.store.set(f"k{n}", text, namespace=namespace, embed=True, content_hash=_hash(text))
    old = index.client.create_collection(
        collection_name(index.prefix, index.model, index.dimensions, namespace),
        metadata={"namespace": namespace, "model": index.model, "dimensions": index.dimensions or 0},
        configuration={"hnsw": {"space": "cosine"}},
        embedding_function=None,
    )
    old.add(
        ids=["k0#0", "k1#0"],
        embeddings=np.array([vector_for("a black cat"), vector_for("a stock trader")], dtype=np.float32),
        metadatas=[
            {"key": "k0", "namespace": namespace, "version": 1, "hash": _hash("a black cat")},
            {"key": "k1", "namespace": namespace, "version": 1, "hash": _hash("a stock trader")},
        ],
    )
    assert _run_json(capsys, ["migrate-index"]) == [{"collection": old.name, "vectors": 2}]
    assert old.name not in [c.name for c in index.client.list_collections()]
    assert set(index.stored([KeyRef(namespace, "k0"), KeyRef(namespace, "k1")])) == {
        KeyRef(namespace, "k0"), KeyRef(namespace, "k1"),
    }  # fmt: skip
    assert [hit.key for hit in memories.search("cat", k=1, namespace=namespace)] == ["k0"]
    assert _run_json(capsys, ["migrate-index"]) == []


def test_vectors_of_another_shard_count_are_carried_into_the_current_shards(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    memories = state.runtime().memories
    current = memories.index
    other = VectorIndex(
        current.client, model=current.model, dimensions=current.dimensions, prefix=current.prefix, shards=3
    )
    memories.store.set(
        "pet", "a black cat", namespace=namespace, embed=True, content_hash=_hash("a black cat")
    )
    other.upsert([IndexEntry(namespace, "pet", 1, _hash("a black cat"))], [vector_for("a black cat")])
    rows = _run_json(capsys, ["migrate-index"])
    assert [row["vectors"] for row in rows] == [1]
    assert [hit.key for hit in memories.search("cat", k=1, namespace=namespace)] == ["pet"]
    assert other.namespaces() == []


def _hash(text: str) -> str:
    from kvstore import content_hash

    return content_hash(text)
