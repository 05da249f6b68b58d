"""MemoryStore against a real Redis: versions, history, ordering, de-duplication, rollback."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from kvstore import (
    Census,
    InvalidKey,
    InvalidValue,
    KeyNotFound,
    LockLost,
    MemoryStore,
    NothingToRollBack,
    Outcome,
    StoreUnavailable,
    ValueTooLarge,
    VersionNotFound,
    WriteMeta,
)


@pytest.fixture
def store(redis_client: redis.Redis, prefix: str) -> Iterator[MemoryStore]:
    yield MemoryStore(redis_client, prefix=prefix, history_length=3, max_value_bytes=1000)
    for key in redis_client.scan_iter(match=f"{prefix}:*"):
        redis_client.delete(key)


def test_a_value_is_read_back_as_the_same_json(store: MemoryStore) -> None:
    value = {"theme": "dark", "sizes": [1, 2.5, None], "ok": True, "name": "Zoë"}
    store.set("user-1:prefs", value)
    assert store.get("user-1:prefs") == value
    assert store.has("user-1:prefs")


def test_every_write_makes_a_new_version(store: MemoryStore) -> None:
    versions = [store.set("k", n).current for n in range(4)]
    assert [record.version for record in versions if record] == [1, 2, 3, 4]


def test_history_keeps_only_the_configured_number_of_earlier_versions(store: MemoryStore) -> None:
    for n in range(10):
        store.set("k", n)
    assert [record.value for record in store.history("k")] == [8, 7, 6]


def test_an_older_message_never_overwrites_a_newer_one(store: MemoryStore) -> None:
    store.set("k", "new", meta=WriteMeta("m-new", 2_000))
    result = store.set("k", "old", meta=WriteMeta("m-old", 1_000))
    assert result.outcome is Outcome.STALE
    assert store.get("k") == "new"
    assert store.history("k") == []


def test_a_tie_in_send_time_is_broken_by_message_id(store: MemoryStore) -> None:
    store.set("k", "b", meta=WriteMeta("b", 1_000))
    assert store.set("k", "a", meta=WriteMeta("a", 1_000)).outcome is Outcome.STALE
    assert store.set("k", "c", meta=WriteMeta("c", 1_000)).outcome is Outcome.APPLIED
    assert store.get("k") == "c"


def test_a_message_applied_twice_has_the_effect_of_one(store: MemoryStore) -> None:
    meta = WriteMeta("m-1", 1_000)
    first = store.set("k", "v", meta=meta)
    second = store.set("k", "v", meta=meta)
    assert (first.outcome, second.outcome) == (Outcome.APPLIED, Outcome.DUPLICATE)
    record = store.record("k")
    assert record is not None and record.version == 1


def test_a_duplicate_of_a_superseded_message_changes_nothing(store: MemoryStore) -> None:
    store.set("k", "one", meta=WriteMeta("m-1", 1_000))
    store.set("k", "two", meta=WriteMeta("m-2", 2_000))
    assert store.set("k", "one", meta=WriteMeta("m-1", 1_000)).outcome is Outcome.STALE
    assert store.get("k") == "two"


def test_direct_writes_in_the_same_millisecond_all_apply(store: MemoryStore) -> None:
    for n in range(50):
        store.set("k", n)
    assert store.get("k") == 49


def test_rollback_restores_the_previous_value_as_a_new_version(store: MemoryStore) -> None:
    store.set("k", "one")
    store.set("k", "two")
    result = store.rollback("k")
    assert store.get("k") == "one"
    assert result.current is not None and result.current.version == 3


def test_a_rollback_can_itself_be_rolled_back(store: MemoryStore) -> None:
    store.set("k", "one")
    store.set("k", "two")
    store.rollback("k")
    store.rollback("k")
    assert store.get("k") == "two"


def test_rollback_to_a_given_retained_version(store: MemoryStore) -> None:
    for value in ["one", "two", "three", "four"]:
        store.set("k", value)
    store.rollback("k", version=2)
    assert store.get("k") == "two"


def test_rollback_to_a_version_no_longer_retained_is_refused(store: MemoryStore) -> None:
    for n in range(6):
        store.set("k", n)
    with pytest.raises(VersionNotFound, match="version 1"):
        store.rollback("k", version=1)
    assert store.get("k") == 5


def test_rolling_back_a_first_version_deletes_the_key(store: MemoryStore) -> None:
    store.set("k", "only")
    store.rollback("k")
    assert not store.has("k")
    assert store.get("k") is None
    assert store.keys() == []


def test_a_deleted_key_comes_back_with_a_rollback(store: MemoryStore) -> None:
    store.set("k", "only")
    store.delete("k")
    store.rollback("k")
    assert store.get("k") == "only"


def test_rolling_back_a_key_never_written_names_the_key(store: MemoryStore) -> None:
    with pytest.raises(KeyNotFound, match="'ghost'"):
        store.rollback("ghost")


def test_rolling_back_a_deleted_key_with_no_history_is_refused(store: MemoryStore) -> None:
    store.set("k", "only")
    store.delete("k")
    store.client.delete(store.keys_of.history("default", "k"))  # as if version 1 had been trimmed away
    with pytest.raises(NothingToRollBack, match="no earlier version"):
        store.rollback("k")


def test_revert_undoes_only_the_version_its_message_wrote(store: MemoryStore) -> None:
    store.set("k", "one", meta=WriteMeta("m-1", 1_000))
    store.set("k", "two", meta=WriteMeta("m-2", 2_000))
    assert not store.revert("k", "m-1")
    assert store.revert("k", "m-2")
    record = store.record("k")
    assert record is not None and (record.value, record.version) == ("one", 1)


def test_keys_lists_the_current_keys_of_a_namespace_only(store: MemoryStore) -> None:
    store.set("a", 1, namespace="user-1")
    store.set("b", 2, namespace="user-1")
    store.set("c", 3, namespace="user-2")
    store.delete("b", namespace="user-1")
    assert store.keys(namespace="user-1") == ["a"]
    assert store.get("c", namespace="user-1") is None


def test_a_value_with_a_ttl_expires(store: MemoryStore) -> None:
    store.set("k", "brief", ttl_ms=100)
    time.sleep(0.3)
    assert store.get("k") is None
    assert store.keys() == []


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "empty"),
        ("a\x00b", "control character U\\+0000"),
        ("a\nb", "U\\+000A"),
        ("x" * 513, "limit"),
        (42, "must be a string"),
        ("\udcff", "U\\+DCFF"),
    ],
)
def test_an_unusable_key_is_refused_with_its_problem_named(
    store: MemoryStore, key: object, problem: str
) -> None:
    with pytest.raises(InvalidKey, match=problem):
        store.set(key, "v")  # type: ignore[arg-type]
    assert store.keys() == []


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (b"bytes", "bytes"),
        ({1: "x"}, "object keys"),
        ({"a": {1, 2}}, "set"),
        ("\udcff", "UTF-8"),
    ],
)
def test_a_value_that_is_not_json_is_refused(store: MemoryStore, value: object, problem: str) -> None:
    with pytest.raises(InvalidValue, match=problem):
        store.set("k", value)
    assert not store.has("k")


def test_a_deeply_nested_value_is_refused(store: MemoryStore) -> None:
    value: object = "leaf"
    for _ in range(5000):
        value = [value]
    with pytest.raises(InvalidValue, match="nested"):
        store.set("k", value)


def test_an_oversized_value_is_refused_and_nothing_is_written(store: MemoryStore) -> None:
    store.set("k", "small")
    with pytest.raises(ValueTooLarge, match="limit is 1000"):
        store.set("k", "x" * 2000)
    assert store.get("k") == "small"


def test_an_unusable_namespace_is_refused(store: MemoryStore) -> None:
    with pytest.raises(InvalidKey, match="namespace"):
        store.set("k", 1, namespace="a:b")


def test_an_unreachable_redis_is_reported_without_its_password() -> None:
    client = redis.Redis.from_url("redis://:hunter2secret@127.0.0.1:1/0", socket_connect_timeout=0.2)
    store = MemoryStore(client)
    with pytest.raises(StoreUnavailable) as caught:
        store.get("k")
    assert "hunter2secret" not in str(caught.value)


def test_a_key_lock_that_expired_before_its_block_ended_says_so(store: MemoryStore) -> None:
    with (
        pytest.raises(LockLost, match="expired while its holder still worked"),
        store.key_lock("k", timeout_ms=50),
    ):
        time.sleep(0.2)
    with store.key_lock("k", timeout_ms=5_000):  # and the key can be locked again
        pass


def test_a_failing_block_under_a_key_lock_reports_its_own_error_and_frees_the_key(store: MemoryStore) -> None:
    with pytest.raises(KeyError), store.key_lock("k"):
        raise KeyError("the block's own")
    with store.key_lock("k", timeout_ms=5_000):
        pass


def test_a_census_counts_live_keys_and_embedded_ones_in_pages(store: MemoryStore) -> None:
    for n in range(5):
        store.set(f"k{n}", n, namespace="counted", embed=n % 2 == 0)
    store.set("gone", "x", namespace="counted", embed=True)
    store.delete("gone", namespace="counted")
    store.set("brief", "x", namespace="counted", embed=True, ttl_ms=50)
    store.set("elsewhere", "x", namespace="other", embed=True)
    time.sleep(0.2)
    assert store.census("counted", page=2) == Census("counted", memories=5, embedded=3)
    assert store.census("never-written") == Census("never-written", 0, 0)
