"""Metadata, filtered search and listing through the actors, the `memsync` command and one-off runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dramatiq
import pytest

import actors
from actors import memory_rollback, memory_sync, memory_sync_batch, state
from actors.cli import main
from actors.errors import RefusedAtSend
from actors.queues import queue_counts
from kvstore import KeyRef, MemoryStore
from tests.support.embedding_server import EmbeddingServer
from tests.support.results import failure_of, result_of
from tests.support.unchecked import send_unchecked
from vectorstore import IndexEntry
from vectorstore.chunks import openai_tokens

#: Metadata the payload check refuses, and the words its error must hold (the field it names).
BAD_METADATA: list[tuple[Any, str]] = [
    ({"colour": None}, r"metadata field 'colour': a null"),
    ({"tags": ["a", "b"]}, r"metadata field 'tags': a list"),
    ({"owner": {"id": 1}}, r"metadata field 'owner': a dict"),
    ({"1st": "x"}, r"metadata field name '1st'"),
    ({"big": 2**64}, r"metadata field 'big': integer out of the 64-bit range"),
    ({"note": "x" * 1100}, r"metadata field 'note': 1100 bytes of text; the limit is 1024"),
    ({f"f{n}": n for n in range(33)}, r"metadata has 33 fields; the limit is 32"),
    ("kind=fact", r"metadata must be an object, not str"),
]
BAD_IDS = ["null", "list", "object", "name", "big-int", "long-text", "too-many", "not-an-object"]

#: Sentences over and over, then a distinct one: a text longer than the model's input limit.
FILLER = (
    "The committee met again on a grey morning. Minutes were read and approved without comment. "
    "Someone asked about the budget, and nobody answered. The coffee was cold, as usual. "
)
SECRET = "Finally, the secret ingredient of grandma's soup was smoked paprika."
QUERY = "secret ingredient grandma soup smoked paprika"


def _dead_letter_reason(message: dramatiq.Message[Any]) -> str:
    letter = state.runtime().dead_letters.get(message.message_id)
    assert letter is not None, "the message was not dead-lettered"
    assert letter.retries == 0
    return letter.reason


def _indexed(namespace: str, key: str) -> bool:
    ref = KeyRef(namespace, key)
    return ref in state.runtime().memories.index.stored([ref])


def _keys(hits: list[Any]) -> list[str]:
    return sorted(hit.key for hit in hits)


# The actors: metadata kept per version, rolled back, and searched on.


def test_metadata_sent_with_a_sync_is_kept_with_its_version_and_its_history(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore
) -> None:
    first = {"kind": "pet", "year": 2020, "weight": 4.5, "indoor": True}
    result_of(memory_sync.send("pet", "the user has a cat", embed=True, namespace=namespace, metadata=first))
    second = {"kind": "pet", "year": 2024}
    result = result_of(
        memory_sync.send("pet", "the user has a dog", embed=True, namespace=namespace, metadata=second)
    )

    assert (result["status"], result["version"]) == ("success", 2)
    record = store.record("pet", namespace=namespace)
    assert record is not None and record.metadata == second
    assert [old.metadata for old in store.history("pet", namespace=namespace)] == [first]
    [hit] = actors.search("dog", k=1, namespace=namespace)
    assert (hit.key, hit.version, dict(hit.metadata)) == ("pet", 2, second)


@pytest.mark.parametrize("same_text", [True, False], ids=["same-text", "new-text"])
def test_a_rollback_through_the_worker_restores_the_older_metadata_in_redis_and_in_search(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore, same_text: bool
) -> None:
    old, new = {"kind": "fact"}, {"kind": "guess", "source": "chat"}
    later = "the user has a black cat" if same_text else "the user plays the cello"
    result_of(memory_sync.send("note", "the user has a black cat", True, namespace, metadata=old))
    result_of(memory_sync.send("note", later, True, namespace, metadata=new))
    assert _keys(actors.search("cat", namespace=namespace, where={"source": "chat"})) == ["note"]

    result = result_of(memory_rollback.send(key="note", namespace=namespace))

    assert (result["status"], result["version"]) == ("rolled_back", 3)
    record = store.record("note", namespace=namespace)
    assert record is not None and (record.value, record.metadata) == ("the user has a black cat", old)
    [hit] = actors.search("cat", namespace=namespace, where={"kind": "fact"})
    assert (hit.key, hit.version, dict(hit.metadata)) == ("note", 3, old)
    assert actors.search("cat", namespace=namespace, where={"kind": "guess"}) == []
    assert actors.search("cat", namespace=namespace, where={"source": "chat"}) == []  # a field cleared


def test_search_with_a_filter_finds_only_the_memories_whose_metadata_matches(
    worker: dramatiq.Worker, namespace: str
) -> None:
    memories = [
        ("cat", "the user has a cat", {"kind": "pet", "year": 2019}),
        ("dog", "the user has a dog", {"kind": "pet", "year": 2023}),
        ("job", "the user is a stock trader", {"kind": "work", "year": 2023}),
        ("bike", "the user rides a red bicycle", {}),
    ]
    for message in [
        memory_sync.send(key, text, True, namespace, metadata=labels) for key, text, labels in memories
    ]:
        result_of(message)

    def found(where: dict[str, Any]) -> list[str]:
        return _keys(actors.search("the user", k=10, namespace=namespace, where=where))

    assert found({"kind": "pet"}) == ["cat", "dog"]
    assert found({"year": {"$gte": 2020}}) == ["dog", "job"]
    assert found({"kind": "pet", "year": 2023}) == ["dog"]
    assert found({"$or": [{"kind": "work"}, {"year": {"$lt": 2020}}]}) == ["cat", "job"]
    assert found({"kind": {"$ne": "pet"}}) == ["bike", "job"]  # $ne matches a memory without the field
    assert found({"kind": "plant"}) == []


def test_min_score_leaves_out_the_hits_less_similar_than_it(worker: dramatiq.Worker, namespace: str) -> None:
    texts = {"cat": "a black cat", "cats": "a black cat and a white cat", "job": "a stock trader"}
    for message in [memory_sync.send(key, text, True, namespace) for key, text in texts.items()]:
        result_of(message)
    hits = actors.search("a black cat", k=3, namespace=namespace)
    assert [hit.key for hit in hits][:2] == ["cat", "cats"] and len(hits) == 3
    threshold = (hits[1].score + hits[2].score) / 2

    kept = actors.search("a black cat", k=3, namespace=namespace, min_score=threshold)

    assert [hit.key for hit in kept] == ["cat", "cats"]
    assert actors.search("a black cat", k=3, namespace=namespace, min_score=1.0) in ([], [hits[0]])


def test_a_metadata_only_change_sent_twice_makes_no_embedding_request(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore, embedding_service: EmbeddingServer
) -> None:
    text = "the user prefers green tea"
    result_of(memory_sync.send("tea", text, True, namespace, metadata={"tag": "a"}))
    assert len(embedding_service.embedding_requests) == 1
    embedding_service.clear_log()

    for _ in range(2):
        result = result_of(memory_sync.send("tea", text, True, namespace, metadata={"tag": "b", "n": 2}))
        assert result["outcome"] == "applied"

    assert embedding_service.embedding_requests == []
    record = store.record("tea", namespace=namespace)
    assert record is not None and (record.version, record.metadata) == (3, {"tag": "b", "n": 2})
    [hit] = actors.search("green tea", namespace=namespace, where={"tag": "b"})
    assert (hit.key, hit.version, dict(hit.metadata)) == ("tea", 3, {"tag": "b", "n": 2})
    assert actors.search("green tea", namespace=namespace, where={"tag": "a"}) == []


def test_a_sync_without_metadata_clears_the_metadata_of_the_key(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore
) -> None:
    result_of(memory_sync.send("tea", "green tea", True, namespace, metadata={"tag": "a"}))
    result_of(memory_sync.send("tea", "green tea", True, namespace))

    record = store.record("tea", namespace=namespace)
    assert record is not None and (record.version, record.metadata) == (2, {})
    assert actors.search("tea", namespace=namespace, where={"tag": "a"}) == []
    [hit] = actors.search("tea", namespace=namespace)
    assert (hit.version, dict(hit.metadata)) == (2, {})


def test_a_key_synced_again_after_it_expired_is_not_found_by_the_metadata_of_its_expired_version(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore
) -> None:
    result_of(memory_sync.send("k", "a black cat", True, namespace, ttl_ms=300, metadata={"source": "chat"}))
    deadline = time.monotonic() + 10
    while store.record("k", namespace=namespace) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.record("k", namespace=namespace) is None
    result = result_of(memory_sync.send("k", "a white dog", True, namespace))
    assert result["version"] == 1

    hits = actors.search("dog", namespace=namespace, where={"source": "chat"})

    assert [(hit.key, dict(hit.metadata)) for hit in hits] == []


def test_metadata_fields_named_as_memsyncs_own_are_the_users_and_never_escape_the_namespace(
    worker: dramatiq.Worker, namespace: str
) -> None:
    labels = {"key": "alias", "namespace": "elsewhere", "version": 7, "hash": "h", "chunk": 0}
    result_of(memory_sync.send("real", "a black cat", True, namespace, metadata=labels))
    result_of(memory_sync.send("other", "a white cat", True, namespace))

    for where in ({"key": "alias"}, {"version": 7}, {"namespace": "elsewhere"}, {"hash": "h"}):
        [hit] = actors.search("cat", namespace=namespace, where=where)
        assert (hit.key, hit.version, dict(hit.metadata)) == ("real", 1, labels)
        assert [r.key for r in actors.memories(namespace, where).memories] == ["real"]
    assert actors.search("cat", namespace=namespace, where={"key": "real"}) == []
    assert actors.search("cat", namespace="elsewhere", where={"namespace": "elsewhere"}) == []


def test_listing_and_search_select_the_same_memories_for_a_filter(namespace: str) -> None:
    memories = state.runtime().memories
    labels: list[dict[str, Any]] = [
        {"w": 2, "flag": True, "s": "1"},
        {"w": 2.0, "flag": False, "s": "x"},
        {"w": 1, "s": 1},
        {"w": 1.5, "flag": 1},
        {},
    ]
    for n, metadata in enumerate(labels):
        memories.sync(f"k{n}", f"memory number {n}", embed=True, namespace=namespace, metadata=metadata)
    filters: list[tuple[dict[str, Any], list[str]]] = [
        ({"w": 2}, ["k0", "k1"]),
        ({"w": {"$eq": 1.5}}, ["k2", "k3"]),  # a stored integer meets the operand truncated
        ({"w": {"$gt": 1.5}}, ["k0", "k1"]),
        ({"w": {"$ne": 2}}, ["k2", "k3", "k4"]),
        ({"w": {"$in": [1, 2]}}, ["k0", "k1", "k2"]),
        ({"flag": True}, ["k0"]),
        ({"flag": 1}, ["k3"]),  # a boolean never equals a number
        ({"s": "1"}, ["k0"]),
        ({"$or": [{"s": 1}, {"flag": False}]}, ["k1", "k2"]),
    ]
    for where, expected in filters:
        listed = [record.key for record in actors.memories(namespace, where).memories]
        found = _keys(actors.search("memory number", k=10, namespace=namespace, where=where))
        assert (listed, found) == (expected, expected), where


def _long_text() -> str:
    per_filler = len(openai_tokens().offsets(FILLER))
    return FILLER * (20_000 // per_filler) + SECRET


def test_a_metadata_only_change_to_a_long_text_relabels_every_chunk_without_embedding(
    worker: dramatiq.Worker, namespace: str, embedding_service: EmbeddingServer
) -> None:
    text = _long_text()
    result_of(memory_sync.send("soup", text, True, namespace, metadata={"kind": "recipe", "old": 1}))
    embedding_service.clear_log()

    result_of(memory_sync.send("soup", text, True, namespace, metadata={"kind": "note"}))

    assert embedding_service.embedding_requests == []
    assert actors.search(QUERY, namespace=namespace, where={"kind": "recipe"}) == []
    assert actors.search(QUERY, namespace=namespace, where={"old": 1}) == []
    [hit] = actors.search(QUERY, namespace=namespace, where={"kind": "note"})
    assert hit.span is not None and text[hit.span[0] : hit.span[1]].endswith(SECRET)
    assert (hit.version, hit.chunk is not None and hit.chunk >= 1) == (2, True)
    entries = sorted(state.runtime().memories.index.entries(namespace), key=lambda entry: entry.chunk)
    assert len(entries) >= 2
    assert [(e.chunk, e.version, dict(e.metadata)) for e in entries] == [
        (n, 2, {"kind": "note"}) for n in range(len(entries))
    ]  # every chunk relabelled, the field the new version lacks cleared


# Bad metadata: refused at send, and dead-lettered by the worker when a sender does not check.


@pytest.mark.parametrize(("metadata", "problem"), BAD_METADATA, ids=BAD_IDS)
def test_bad_metadata_from_a_sender_that_does_not_check_is_dead_lettered_naming_the_field(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore, metadata: Any, problem: str
) -> None:
    message = send_unchecked(
        memory_sync, key="k", value="a black cat", embed=True, namespace=namespace, metadata=metadata
    )

    assert "InvalidPayload" in failure_of(message)
    reason = _dead_letter_reason(message)
    assert re.search(problem, reason), reason
    assert store.record("k", namespace=namespace) is None
    assert not _indexed(namespace, "k")


def test_bad_metadata_for_a_key_that_exists_leaves_its_version_as_it_was(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore, embedding_service: EmbeddingServer
) -> None:
    result_of(memory_sync.send("k", "a black cat", True, namespace, metadata={"kind": "fact"}))
    embedding_service.clear_log()

    message = send_unchecked(
        memory_sync, key="k", value="a white dog", embed=True, namespace=namespace, metadata={"kind": None}
    )

    failure_of(message)
    assert "metadata field 'kind'" in _dead_letter_reason(message)
    record = store.record("k", namespace=namespace)
    assert record is not None and (record.version, record.value, record.metadata) == (
        1, "a black cat", {"kind": "fact"},
    )  # fmt: skip
    assert embedding_service.embedding_requests == []


@pytest.mark.parametrize(("metadata", "problem"), BAD_METADATA, ids=BAD_IDS)
def test_bad_metadata_is_refused_at_send_naming_the_problem_and_nothing_is_queued(
    store: MemoryStore, namespace: str, metadata: Any, problem: str, empty_queues: None
) -> None:
    with pytest.raises(RefusedAtSend, match=rf"invalid payload: metadata: .*{problem}"):
        memory_sync.send(key="k", value="v", embed=True, namespace=namespace, metadata=metadata)
    assert queue_counts(actors.broker, memory_sync.queue_name).ready == 0
    assert store.keys(namespace=namespace) == []


# The batch actor.


def test_a_batch_keeps_each_items_metadata_and_an_item_with_bad_metadata_fails_alone(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore, embedding_service: EmbeddingServer
) -> None:
    items: list[dict[str, Any]] = [
        {"key": "cat", "value": "the user has a cat", "embed": True, "metadata": {"kind": "pet"}},
        {"key": "bad", "value": "the user has a fish", "embed": True, "metadata": {"kind": ["pet"]}},
        {"key": "prefs", "value": {"theme": "dark"}, "metadata": {"kind": "setting", "v": 2}},
        {"key": "dog", "value": "the user has a dog", "embed": True},
    ]
    answer = result_of(memory_sync_batch.send(items=[{**item, "namespace": namespace} for item in items]))

    results = answer["results"]
    assert [r["status"] for r in results] == ["success", "failed", "success", "success"]
    assert "metadata field 'kind': a list" in results[1]["error"]
    assert (results[1]["key"], results[1]["namespace"]) == ("bad", namespace)
    assert answer["counts"]["applied"] == 3 and answer["counts"]["failed"] == 1
    assert store.keys(namespace=namespace) == ["cat", "dog", "prefs"]
    assert [r.inputs for r in embedding_service.embedding_requests] == [2]
    for item in items:
        record = store.record(item["key"], namespace=namespace)
        if item["key"] != "bad":
            assert record is not None and record.metadata == item.get("metadata", {})
    assert _keys(actors.search("the user", k=5, namespace=namespace, where={"kind": "pet"})) == ["cat"]
    listed = actors.memories(namespace, {"kind": {"$in": ["pet", "setting"]}})
    assert ([r.key for r in listed.memories], listed.cursor) == (["cat", "prefs"], None)


def test_a_batch_whose_items_change_only_metadata_embeds_nothing(
    worker: dramatiq.Worker, namespace: str, store: MemoryStore, embedding_service: EmbeddingServer
) -> None:
    texts = {f"k{n}": f"memory {n} about the garden" for n in range(3)}
    first = [{"key": k, "value": t, "embed": True, "namespace": namespace} for k, t in texts.items()]
    result_of(memory_sync_batch.send(items=first))
    embedding_service.clear_log()

    relabelled = [{**item, "metadata": {"checked": True}} for item in first]
    answer = result_of(memory_sync_batch.send(items=relabelled, skip_unchanged=True))

    assert [r["outcome"] for r in answer["results"]] == ["applied"] * 3  # metadata is part of "unchanged"
    assert embedding_service.embedding_requests == []
    hits = actors.search("garden", k=5, namespace=namespace, where={"checked": True})
    assert sorted((hit.key, hit.version) for hit in hits) == [("k0", 2), ("k1", 2), ("k2", 2)]
    again = result_of(memory_sync_batch.send(items=relabelled, skip_unchanged=True))
    assert [r["outcome"] for r in again["results"]] == ["unchanged"] * 3


# Listing through the API.


def test_memories_pages_through_a_namespace_in_key_order_leaving_out_deleted_keys(
    namespace: str, store: MemoryStore
) -> None:
    for n in range(7):
        store.set(f"k{n}", n, namespace=namespace, metadata={"even": n % 2 == 0})
    store.delete("k3", namespace=namespace)

    pages, cursor = [], None
    while True:
        page = actors.memories(namespace, limit=2, cursor=cursor)
        pages.append([record.key for record in page.memories])
        if (cursor := page.cursor) is None:
            break

    assert [key for keys in pages for key in keys] == ["k0", "k1", "k2", "k4", "k5", "k6"]
    assert all(len(keys) <= 2 for keys in pages)
    evens = actors.memories(namespace, {"even": True})
    assert ([r.key for r in evens.memories], evens.cursor) == (["k0", "k2", "k4", "k6"], None)
    assert [r.metadata for r in evens.memories] == [{"even": True}] * 4


# The command line.


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    """`memsync argv`: its exit status, stdout and stderr (an argument error exits as the command would)."""
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as leaving:
        status = leaving.code if isinstance(leaving.code, int) else 1
    printed = capsys.readouterr()
    return status, printed.out, printed.err


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    status, out, err = _run(capsys, [*argv, "--json"])
    assert status == 0, err
    return json.loads(out)


def _fill(namespace: str, count: int) -> None:
    memories = state.runtime().memories
    for n in range(count):
        labels = {"kind": "pet" if n % 2 else "fact", "n": n}
        memories.sync(f"m{n}", f"memory {n}", embed=True, namespace=namespace, metadata=labels)


def test_list_json_pages_with_limit_and_cursor_and_shows_metadata(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    _fill(namespace, 5)

    pages, cursor = [], None
    while True:
        extra: list[str] = [] if cursor is None else ["--cursor", cursor]
        page = _json(capsys, ["list", "--namespace", namespace, "--limit", "2", *extra])
        assert set(page) == {"memories", "cursor"}
        pages.append(page["memories"])
        if (cursor := page["cursor"]) is None:
            break

    assert [[row["key"] for row in rows] for rows in pages] == [["m0", "m1"], ["m2", "m3"], ["m4"]]
    first = pages[0][0]
    assert first == {
        "namespace": namespace, "key": "m0", "version": 1, "value": "memory 0", "embed": True,
        "deleted": False, "updated_at_ms": first["updated_at_ms"], "metadata": {"kind": "fact", "n": 0},
    }  # fmt: skip


def test_list_text_prints_a_line_per_memory_and_the_next_cursor_on_stderr(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    _fill(namespace, 3)

    status, out, err = _run(capsys, ["list", "--namespace", namespace, "--limit", "2"])
    assert (status, out) == (0, 'm0 (v1): "memory 0"\nm1 (v1): "memory 1"\n')
    match = re.fullmatch(r"more: --cursor (\S+)\n", err)
    assert match is not None, err

    status, out, err = _run(capsys, ["list", "--namespace", namespace, "--limit", "2", "--cursor", match[1]])
    assert (status, out, err) == (0, 'm2 (v1): "memory 2"\n', "")


def test_list_where_keeps_only_the_memories_whose_metadata_matches(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    _fill(namespace, 6)
    page = _json(capsys, ["list", "--namespace", namespace, "--where", '{"kind": "pet"}'])
    assert [row["key"] for row in page["memories"]] == ["m1", "m3", "m5"]
    assert page["cursor"] is None

    where = '{"$and": [{"kind": "fact"}, {"n": {"$gt": 0}}]}'
    first = _json(capsys, ["list", "--namespace", namespace, "--where", where, "--limit", "1"])
    rest = _json(capsys, ["list", "--namespace", namespace, "--where", where, "--cursor", first["cursor"]])
    assert [row["key"] for row in first["memories"] + rest["memories"]] == ["m2", "m4"]


def test_list_of_an_empty_namespace_prints_nothing_and_exits_zero(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    assert _run(capsys, ["list", "--namespace", namespace]) == (0, "", "")
    assert _json(capsys, ["list", "--namespace", namespace]) == {"memories": [], "cursor": None}


def test_search_where_and_min_score_narrow_the_hits(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    memories = state.runtime().memories
    memories.sync("cat", "a black cat", embed=True, namespace=namespace, metadata={"kind": "pet"})
    memories.sync("cats", "a black cat and a dog", embed=True, namespace=namespace, metadata={"kind": "pet"})
    memories.sync("job", "a stock trader", embed=True, namespace=namespace, metadata={"kind": "work"})
    base = ["search", "a black cat", "--namespace", namespace]

    every = _json(capsys, base)
    pets = _json(capsys, [*base, "--where", '{"kind": "pet"}'])
    assert [row["key"] for row in every] == ["cat", "cats", "job"]
    assert [row["key"] for row in pets] == ["cat", "cats"]
    threshold = (every[0]["score"] + every[1]["score"]) / 2
    assert [row["key"] for row in _json(capsys, [*base, "--min-score", str(threshold)])] == ["cat"]

    status, out, err = _run(capsys, [*base, "--where", '{"kind": "plant"}'])
    assert (status, out, err) == (1, "", f"no memories match in namespace {namespace}\n")


def test_search_json_shows_metadata_and_a_null_chunk_and_span_for_a_short_text(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    state.runtime().memories.sync(
        "pet", "a black cat", embed=True, namespace=namespace, metadata={"kind": "pet", "age": 3}
    )
    [hit] = _json(capsys, ["search", "cat", "--namespace", namespace])
    assert {name: hit[name] for name in ("key", "metadata", "chunk", "span")} == {
        "key": "pet", "metadata": {"kind": "pet", "age": 3}, "chunk": None, "span": None,
    }  # fmt: skip


def test_search_json_of_a_long_text_names_the_chunk_that_matched_and_its_span(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    text = _long_text()
    state.runtime().memories.sync("soup", text, embed=True, namespace=namespace, metadata={"kind": "recipe"})

    [hit] = _json(capsys, ["search", QUERY, "--namespace", namespace])

    assert (hit["key"], hit["value"], hit["metadata"]) == ("soup", text, {"kind": "recipe"})
    assert isinstance(hit["chunk"], int) and hit["chunk"] >= 1
    start, end = hit["span"]
    assert 0 < start < end == len(text)
    assert text[start:end].endswith(SECRET)


def test_a_long_text_replaced_by_a_short_one_shows_no_chunk_or_span(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    memories = state.runtime().memories
    memories.sync("soup", _long_text(), embed=True, namespace=namespace)
    memories.sync("soup", "a short soup of smoked paprika", embed=True, namespace=namespace)

    [hit] = _json(capsys, ["search", QUERY, "--namespace", namespace])

    assert (hit["version"], hit["chunk"], hit["span"]) == (2, None, None)


def test_get_json_shows_the_metadata_of_every_version(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    store = state.runtime().store
    store.set("k", "one", namespace=namespace, metadata={"kind": "fact"})
    store.set("k", "two", namespace=namespace)
    rows = _json(capsys, ["get", "k", "--namespace", namespace])
    assert [(row["version"], row["metadata"]) for row in rows] == [(2, {}), (1, {"kind": "fact"})]


def test_reconcile_relabels_a_vector_whose_metadata_differs_from_its_record(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    memories = state.runtime().memories
    memories.sync("k", "a black cat", embed=True, namespace=namespace, metadata={"kind": "fact"})
    record = memories.store.record("k", namespace=namespace)
    assert record is not None
    # The index drifts: its vector carries labels the record never had.
    memories.index.relabel([IndexEntry(namespace, "k", 1, record.content_hash, metadata={"kind": "guess"})])
    assert actors.search("cat", namespace=namespace, where={"kind": "fact"}) == []

    [drift] = _json(capsys, ["reconcile", "--namespace", namespace])

    assert drift["stale"] == 1
    assert _keys(actors.search("cat", namespace=namespace, where={"kind": "fact"})) == ["k"]
    assert actors.search("cat", namespace=namespace, where={"kind": "guess"}) == []


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        pytest.param(["search", "cat", "--where", "{kind: pet}"], r"--where.*not JSON"),
        pytest.param(["list", "--where", "kind=pet"], r"--where.*not JSON"),
        (["search", "cat", "--where", '{"x": {"$regex": "a"}}'], r"InvalidFilter: .*'\$regex'"),
        (["list", "--where", '{"x": {"$regex": "a"}}'], r"InvalidFilter: .*'\$regex'"),
        (["list", "--where", '["kind", "pet"]'], r"InvalidFilter: where: expected a filter object"),
        (["search", "cat", "--where", '{"n": {"$gt": "2"}}'], r"InvalidFilter: .*compares numbers only"),
        (["search", "cat", "--min-score", "2"], r"InvalidQuery: min_score must be a number from -1 to 1"),
        (["list", "--limit", "0"], r"InvalidFilter: limit must be an integer from 1 to 1000"),
        (["list", "--cursor", "!!"], r"InvalidFilter: cursor is not one a page of memories gave"),
    ],
    ids=[
        "search-not-json", "list-not-json", "search-regex", "list-regex", "list-not-an-object",
        "search-gt-a-string", "min-score-past-one", "limit-zero", "bad-cursor",
    ],
)  # fmt: skip
def test_bad_search_or_list_input_exits_two_with_one_line_naming_the_problem(
    capsys: pytest.CaptureFixture[str], namespace: str, argv: list[str], problem: str
) -> None:
    status, out, err = _run(capsys, [*argv, "--namespace", namespace])
    lines = err.splitlines()
    assert (status, out) == (2, ""), err
    assert len(lines) == 1 and re.search(problem, lines[0]), err


# Export and import.


def _labelled(namespace: str) -> list[dict[str, Any]]:
    return [
        {"key": "a", "value": "the user has a cat", "embed": True, "namespace": namespace,
         "metadata": {"kind": "pet", "year": 2021, "score": 0.5, "sure": False}},
        {"key": "b", "value": {"theme": "dark"}, "embed": False, "namespace": namespace,
         "metadata": {"kind": "setting"}},
        {"key": "c", "value": "the user is a stock trader", "embed": True, "namespace": namespace},
    ]  # fmt: skip


def _import(capsys: pytest.CaptureFixture[str], source: Path, *extra: str) -> dict[str, Any]:
    status, out, err = _run(capsys, ["import", str(source), *extra, "--json"])
    assert status in (0, 1), err
    summary: dict[str, Any] = json.loads(out)
    return summary


def _write_lines(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _export(capsys: pytest.CaptureFixture[str], namespace: str, path: Path) -> list[dict[str, Any]]:
    assert _run(capsys, ["export", "--namespace", namespace, "-o", str(path)])[0] == 0
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda row: row["key"])


def test_export_writes_metadata_only_for_memories_that_have_some(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, namespace: str
) -> None:
    memories = state.runtime().memories
    for row in _labelled(namespace):
        memories.sync(
            row["key"], row["value"], embed=row["embed"], namespace=namespace, metadata=row.get("metadata")
        )
    assert _export(capsys, namespace, tmp_path / "out.jsonl") == _labelled(namespace)


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "through-the-workers"])
def test_export_then_import_into_another_namespace_keeps_the_metadata(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    namespace: str,
    store: MemoryStore,
    worker: dramatiq.Worker,
    in_process: bool,
) -> None:
    extra = ["--in-process"] if in_process else []
    assert _import(capsys, _write_lines(tmp_path / "in.jsonl", _labelled(namespace)), *extra)["applied"] == 3
    exported = _export(capsys, namespace, tmp_path / "out.jsonl")
    other = f"{namespace}-copy"

    summary = _import(
        capsys, _write_lines(tmp_path / "copy.jsonl", [{**r, "namespace": other} for r in exported])
    )

    assert (summary["applied"], summary["failed"]) == (3, 0)
    for row in _labelled(namespace):
        record = store.record(row["key"], namespace=other)
        assert record is not None and record.metadata == row.get("metadata", {})
    assert _keys(actors.search("the user", namespace=other, where={"kind": "pet"})) == ["a"]
    again = _import(capsys, tmp_path / "out.jsonl", *extra)
    assert (again["applied"], again["unchanged"]) == (0, 3)


def test_an_import_line_with_new_metadata_makes_a_version_without_embedding_and_bad_metadata_fails_its_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    namespace: str,
    store: MemoryStore,
    embedding_service: EmbeddingServer,
) -> None:
    rows = _labelled(namespace)
    _import(capsys, _write_lines(tmp_path / "in.jsonl", rows), "--in-process")
    embedding_service.clear_log()
    changed = [
        {**rows[0], "metadata": {"kind": "pet", "year": 2022}},
        rows[1],
        {**rows[2], "metadata": {"x": None}},
    ]

    summary = _import(capsys, _write_lines(tmp_path / "changed.jsonl", changed), "--in-process")

    assert (summary["applied"], summary["unchanged"], summary["failed"]) == (1, 1, 1)
    [failure] = summary["failures"]
    assert failure.startswith("line 3: 'c': ") and "metadata field 'x'" in failure, failure
    assert embedding_service.embedding_requests == []
    record = store.record("a", namespace=namespace)
    assert record is not None and (record.version, record.metadata) == (2, {"kind": "pet", "year": 2022})
    unchanged = store.record("c", namespace=namespace)
    assert unchanged is not None and (unchanged.version, unchanged.metadata) == (1, {})


# One-off runs.


def _one_off(payload: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_JOB", "WORKER_PAYLOAD")}
    env.update(WORKER_JOB="MEMORY_SYNC", WORKER_PAYLOAD=json.dumps(payload))
    return subprocess.run(
        [sys.executable, "-m", "actors"], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.timeout(60)
def test_a_one_off_sync_with_metadata_writes_it_and_its_vector_carries_it(
    namespace: str, store: MemoryStore
) -> None:
    metadata = {"kind": "pet", "year": 2024, "weight": 4.5, "indoor": True}
    done = _one_off(
        {"key": "pet", "value": "a black cat", "embed": True, "namespace": namespace, "metadata": metadata}
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == 1
    record = store.record("pet", namespace=namespace)
    assert record is not None and record.metadata == metadata
    [hit] = actors.search("cat", namespace=namespace, where={"indoor": True})
    assert dict(hit.metadata) == metadata


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("metadata", "problem"), BAD_METADATA[:4], ids=BAD_IDS[:4])
def test_a_one_off_sync_with_bad_metadata_exits_two_with_one_line_naming_the_field(
    namespace: str, store: MemoryStore, metadata: Any, problem: str
) -> None:
    done = _one_off({"key": "pet", "value": "a black cat", "namespace": namespace, "metadata": metadata})
    lines = done.stderr.splitlines()
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert len(lines) == 1 and re.search(problem, lines[0]), done.stderr
    assert store.record("pet", namespace=namespace) is None
