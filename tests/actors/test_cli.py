"""The `memsync` command, called in-process on the test services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq.results import ResultFailure

from actors import memory_sync, state
from actors.cli import main
from kvstore import KeyRef
from tests.support.embedding_server import EmbeddingServer
from tests.support.services import free_port
from tests.support.unchecked import send_unchecked


def _rows(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = _json(capsys, argv)  # type: ignore[assignment]
    return rows


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
    rows = _rows(capsys, ["get", "k", "--namespace", namespace])
    assert [(row["version"], row["value"]) for row in rows] == [(2, "two"), (1, "one")]


def test_get_of_a_key_never_written_says_so_on_stderr_and_exits_one(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    assert main(["get", "ghost", "--namespace", namespace]) == 1
    printed = capsys.readouterr()
    assert (printed.out, printed.err) == ("", f'no memory "ghost" in namespace {namespace}\n')


def test_get_without_a_namespace_names_the_default_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", f"ghost-{uuid.uuid4().hex}"]) == 1
    assert capsys.readouterr().err.endswith(" in namespace default\n")


def test_get_json_of_a_key_never_written_prints_an_empty_list_and_exits_one(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    assert main(["get", "ghost", "--namespace", namespace, "--json"]) == 1
    printed = capsys.readouterr()
    assert json.loads(printed.out) == [] and "no memory" in printed.err


def test_get_and_search_print_a_memory_in_one_shape_with_its_value_as_json(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    state.runtime().memories.sync("pet", {"kind": "cat", "colour": "black"}, embed=True, namespace=namespace)
    [got] = _rows(capsys, ["get", "pet", "--namespace", namespace])
    [hit] = _rows(capsys, ["search", "cat", "--namespace", namespace])
    assert {name: hit[name] for name in got} == got
    assert set(hit) - set(got) == {"score", "chunk", "span"}
    assert got == {
        "namespace": namespace,
        "key": "pet",
        "version": 1,
        "value": {"kind": "cat", "colour": "black"},
        "embed": True,
        "deleted": False,
        "updated_at_ms": got["updated_at_ms"],
        "metadata": {},
    }
    assert abs(got["updated_at_ms"] - time.time() * 1000) < 600_000


def test_a_deleted_version_shows_no_value_and_says_deleted(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    store = state.runtime().store
    store.set("k", "one", namespace=namespace)
    store.delete("k", namespace=namespace)
    rows = _rows(capsys, ["get", "k", "--namespace", namespace])
    assert [(row["version"], row["value"], row["deleted"]) for row in rows] == [
        (2, None, True),
        (1, "one", False),
    ]
    assert main(["get", "k", "--namespace", namespace]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("v2  (deleted)")


def test_search_scores_are_rounded_to_four_decimals(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    memories = state.runtime().memories
    for n, text in enumerate(["a black cat", "a stock trader", "a red bicycle"]):
        memories.sync(f"k{n}", text, embed=True, namespace=namespace)
    rows = _rows(capsys, ["search", "a cat on a bicycle", "--namespace", namespace])
    scores = [row["score"] for row in rows]
    assert len(scores) == 3 and all(score == round(score, 4) for score in scores)
    capsys.readouterr()
    assert main(["search", "a cat on a bicycle", "--namespace", namespace]) == 0
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert printed == [f"{score:.4f}" for score in scores]


def test_search_with_no_hits_says_so_on_stderr_and_exits_one_as_grep_does(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    assert main(["search", "anything", "--namespace", namespace]) == 1
    printed = capsys.readouterr()
    assert (printed.out, printed.err) == ("", f"no memories match in namespace {namespace}\n")
    assert main(["search", "anything", "--namespace", namespace, "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == []


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
        {"message_id": message.message_id, "replayed": True, "refused": None}
    ]
    assert message.get_result(block=True, timeout=20_000)["status"] == "success"


def test_dlq_replay_keeps_a_letter_that_would_fail_again_and_replays_the_others(
    capsys: pytest.CaptureFixture[str],
    worker: dramatiq.Worker,
    namespace: str,
    embedding_service: EmbeddingServer,
) -> None:
    invalid = send_unchecked(memory_sync, key="k", value="v", embed="yes", namespace=namespace)
    embedding_service.fail_next(400)
    valid = memory_sync.send(key="k2", value="v", embed=True, namespace=namespace)
    for message in (invalid, valid):
        with pytest.raises(ResultFailure):
            message.get_result(block=True, timeout=20_000)
    capsys.readouterr()
    assert main(["dlq", "replay", invalid.message_id, valid.message_id]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{invalid.message_id}: kept, it would fail again: invalid payload: embed")
    assert printed[1] == f"{valid.message_id}: replayed"
    assert valid.get_result(block=True, timeout=20_000)["status"] == "success"
    dead_letters = state.runtime().dead_letters
    assert dead_letters.get(invalid.message_id) is not None and dead_letters.get(valid.message_id) is None
    with pytest.raises(ResultFailure):  # its stored failure is kept too
        invalid.get_result()


def test_dlq_replay_of_an_unknown_id_exits_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dlq", "replay", "no-such-id"]) == 1
    assert "not found" in capsys.readouterr().out


def test_no_command_prints_usage_and_exits_two(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: memsync" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "path"),
    [
        (["import", "--in-process", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
        (["export", "-o", "/no/such/dir/out.jsonl"], "/no/such/dir/out.jsonl"),
    ],
)
def test_a_file_that_cannot_be_opened_is_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], argv: list[str], path: str
) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: cannot open {path}: No such file or directory\n"


def test_chroma_out_of_reach_is_one_line_naming_where() -> None:
    port = free_port()
    env = {**os.environ, "CHROMA_URL": f"http://127.0.0.1:{port}"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "memsync"), "search", "a cat"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (1, "")
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Chroma failed"), done.stderr
    assert lines[0].endswith(f"(Chroma at 127.0.0.1:{port}); is CHROMA_URL right, and is Chroma running?")
