"""The `memsync` command, called in-process on the test services."""

from __future__ import annotations

import json

import dramatiq
import pytest

from actors import memory_sync, state
from actors.cli import main
from kvstore import KeyRef
from tests.support.embedding_server import EmbeddingServer


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> object:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_get_prints_the_current_record_and_its_history(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    store = state.runtime().store
    store.set("k", "one", namespace=namespace)
    store.set("k", "two", namespace=namespace)
    rows = _json(capsys, ["get", "k", "--namespace", namespace])
    assert [(row["version"], row["value_json"]) for row in rows] == [(2, '"two"'), (1, '"one"')]  # type: ignore[attr-defined]


def test_get_of_a_key_never_written_exits_one(capsys: pytest.CaptureFixture[str], namespace: str) -> None:
    assert main(["get", "ghost", "--namespace", namespace]) == 1


def test_search_prints_current_hits_closest_first(capsys: pytest.CaptureFixture[str], namespace: str) -> None:
    memories = state.runtime().memories
    memories.sync("pet", "a black cat", embed=True, namespace=namespace)
    memories.sync("job", "a stock trader", embed=True, namespace=namespace)
    rows = _json(capsys, ["search", "cat", "-k", "1", "--namespace", namespace])
    assert rows == [{**rows[0], "key": "pet", "value": "a black cat", "version": 1}]  # type: ignore[index]


def test_reconcile_reports_and_repairs_drift(capsys: pytest.CaptureFixture[str], namespace: str) -> None:
    memories = state.runtime().memories
    memories.sync("pet", "a black cat", embed=True, namespace=namespace)
    memories.index.delete([KeyRef(namespace, "pet")])
    first = _json(capsys, ["reconcile", "--namespace", namespace])
    second = _json(capsys, ["reconcile", "--namespace", namespace])
    assert first == [{"namespace": namespace, "missing": 1, "stale": 0, "orphan": 0, "repaired": True}]
    assert second == [{"namespace": namespace, "missing": 0, "stale": 0, "orphan": 0, "repaired": True}]


def test_dlq_list_and_replay(
    capsys: pytest.CaptureFixture[str],
    worker: dramatiq.Worker,
    namespace: str,
    embedding_service: EmbeddingServer,
) -> None:
    embedding_service.fail_next(400, message="this input is refused")
    message = memory_sync.send(key="k", value="v", embed=True, namespace=namespace)
    with pytest.raises(Exception, match="EmbeddingRejected"):
        message.get_result(block=True, timeout=20_000)
    rows = _json(capsys, ["dlq", "list"])
    mine = [row for row in rows if row["message_id"] == message.message_id]  # type: ignore[attr-defined]
    assert mine and "this input is refused" in mine[0]["reason"] and mine[0]["key"] == "k"
    assert _json(capsys, ["dlq", "replay", message.message_id]) == [
        {"message_id": message.message_id, "replayed": True}
    ]
    assert message.get_result(block=True, timeout=20_000)["status"] == "success"


def test_dlq_replay_of_an_unknown_id_exits_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dlq", "replay", "no-such-id"]) == 1
    assert "not found" in capsys.readouterr().out


def test_no_command_prints_usage_and_exits_two(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: memsync" in capsys.readouterr().out
