"""Dramatiq's Retries options on memsync's broker: per actor and message, jitter, Retry-After, dead letters.

The worker is in-process (the `worker` fixture); each retry's delay is read from the line the retry
middleware logs for it (`outcome=retrying ... delay_ms=N`), and checked against what the embedding
server saw (its requests' arrival times) or what the dead letter kept (`requeue_timestamp`).
The test environment's own policy is 3 retries, backoff 50 ms doubling to 400 ms.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import compute_backoff
from dramatiq.errors import Retry
from dramatiq.middleware import CurrentMessage

from actors import memory_sync, memory_sync_batch, state
from actors.deadletter import DeadLetter
from actors.errors import PERMANENT_ERRORS
from actors.retry import MAX_RETRY_AFTER_MS, RetryPolicy, policy_for
from kvstore import BrokerKeys
from tests.support.brokers import redis_broker_only
from tests.support.embedding_server import EmbeddingServer
from tests.support.results import failure_of, result_of
from tests.support.worker import wait_until
from vectorstore.errors import EmbeddingRejected, EmbeddingUnavailable, IndexUnavailable

QUEUE = state.settings().queue
BROKER = state.broker()

#: What the exhaustion actor received, by the failed message's id: (message data, retry info).
_exhausted: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
#: When each attempt of `asks_again` ran (time.monotonic()), by message id.
_attempts: dict[str, list[float]] = {}


@dramatiq.actor(broker=BROKER, actor_name="test_retries_exhausted", queue_name=QUEUE)
def retries_exhausted(message_data: dict[str, Any], retry_info: dict[str, Any]) -> None:
    """Keeps what Dramatiq's `on_retry_exhausted` sends."""
    _exhausted[message_data["message_id"]] = (message_data, retry_info)


@dramatiq.actor(broker=BROKER, actor_name="test_retries_asks_again", queue_name=QUEUE, max_retries=1)
def asks_again(delay_ms: int) -> int:
    """Raises `Retry(delay=delay_ms)` on its first attempt, and succeeds on the next."""
    message = CurrentMessage.get_current_message()
    assert message is not None
    _attempts.setdefault(message.message_id, []).append(time.monotonic())
    if not message.options.get("retries"):
        raise Retry(delay=delay_ms)
    return len(_attempts[message.message_id])


@dramatiq.actor(broker=BROKER, actor_name="test_retries_has_a_bug", queue_name=QUEUE, max_retries=0)
def has_a_bug(value: str) -> None:
    """Fails as a bug would, with the value in the error's text."""
    raise KeyError(value)


# --- helpers -------------------------------------------------------------------------------------

_FIELD = re.compile(r"(\w+)=('[^']*'|\S+)")


@pytest.fixture
def message_lines(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[str], list[dict[str, str]]]]:
    """`message_lines(message_id)`: the fields of each line memsync logged about that message, in order."""
    caplog.set_level(logging.INFO, logger="memsync")

    def lines(message_id: str) -> list[dict[str, str]]:
        texts = [record.getMessage() for record in caplog.records if record.name.startswith("memsync")]
        return [dict(_FIELD.findall(text)) for text in texts if f"[{message_id}] " in text]

    yield lines


def retry_delays(lines: list[dict[str, str]]) -> list[int]:
    return [int(line["delay_ms"]) for line in lines if line.get("outcome") == "retrying"]


def dead_letter(message_id: str) -> DeadLetter:
    letter = state.runtime().dead_letters.get(message_id)
    assert letter is not None, "the message was not dead-lettered"
    return letter


def gaps_s(server: EmbeddingServer) -> list[float]:
    """The time between one embedding request and the next, in seconds."""
    arrivals = [request.arrived_s for request in server.embedding_requests]
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


def settle(worker: dramatiq.Worker) -> None:
    """Wait until every message sent so far (delayed ones included) has been processed."""
    BROKER.join(QUEUE, timeout=20_000)
    worker.join()


def sync_kwargs(namespace: str, key: str = "k") -> dict[str, Any]:
    return {"key": key, "value": "the user likes tea", "embed": True, "namespace": namespace}


# --- options per message -------------------------------------------------------------------------


def test_a_message_sent_with_max_retries_zero_is_dead_lettered_after_its_first_transient_failure(
    worker: dramatiq.Worker, namespace: str, embedding_service: EmbeddingServer
) -> None:
    embedding_service.fail_next(503, count=5)
    message = memory_sync.send_with_options(kwargs=sync_kwargs(namespace), max_retries=0)
    assert "EmbeddingUnavailable" in failure_of(message)
    assert dead_letter(message.message_id).retries == 0
    assert [request.status for request in embedding_service.embedding_requests] == [503]


def test_max_retries_per_message_gives_that_many_retries_each_logged_on_one_line(
    worker: dramatiq.Worker,
    namespace: str,
    embedding_service: EmbeddingServer,
    message_lines: Callable[[str], list[dict[str, str]]],
) -> None:
    embedding_service.fail_next(503, count=10)
    message = memory_sync.send_with_options(kwargs=sync_kwargs(namespace), max_retries=5)
    failure_of(message)
    assert dead_letter(message.message_id).retries == 5
    assert len(embedding_service.embedding_requests) == 6  # the first attempt and 5 retries
    lines = message_lines(message.message_id)
    assert [(line["attempt"], line["outcome"]) for line in lines] == [
        *((str(n), "retrying") for n in range(1, 6)),
        ("6", "failed"),
    ]
    assert all(line["error"] == "EmbeddingUnavailable" and "ms" in line for line in lines)


def test_a_batch_sent_with_max_retries_zero_is_dead_lettered_after_its_first_transient_failure(
    worker: dramatiq.Worker, namespace: str, embedding_service: EmbeddingServer
) -> None:
    embedding_service.fail_next(503, count=5)
    items = [sync_kwargs(namespace, "a"), sync_kwargs(namespace, "b")]
    message = memory_sync_batch.send_with_options(kwargs={"items": items}, max_retries=0)
    failure_of(message)
    assert dead_letter(message.message_id).retries == 0
    assert len(embedding_service.embedding_requests) == 1


def test_min_and_max_backoff_per_message_set_the_delay_of_a_retry(
    worker: dramatiq.Worker,
    namespace: str,
    embedding_service: EmbeddingServer,
    message_lines: Callable[[str], list[dict[str, str]]],
) -> None:
    embedding_service.fail_next(503)
    message = memory_sync.send_with_options(
        kwargs=sync_kwargs(namespace), min_backoff=1500, max_backoff=60_000
    )
    assert result_of(message)["outcome"] == "applied"
    (delay,) = retry_delays(message_lines(message.message_id))
    assert 1500 <= delay <= 3000  # the first retry: min_backoff, jittered up to twice; the default is 50-100
    (gap,) = gaps_s(embedding_service)
    assert gap >= delay / 1000


def test_max_backoff_per_message_caps_every_delay_below_the_workers_own_cap(
    worker: dramatiq.Worker,
    namespace: str,
    embedding_service: EmbeddingServer,
    message_lines: Callable[[str], list[dict[str, str]]],
) -> None:
    embedding_service.fail_next(503, count=4)
    message = memory_sync.send_with_options(
        kwargs=sync_kwargs(namespace), max_retries=4, min_backoff=100, max_backoff=120
    )
    assert result_of(message)["outcome"] == "applied"
    delays = retry_delays(message_lines(message.message_id))
    # Capped as Dramatiq caps a jittered delay: 50-100% of max_backoff. Uncapped, the third retry
    # alone would wait 400-800 ms (the worker's own cap, 400, would bring it to 200-400).
    assert len(delays) == 4 and all(60 <= delay <= 120 for delay in delays), delays


@redis_broker_only  # it counts the Redis broker's hash of queued messages
def test_a_callable_option_cannot_travel_with_a_message_and_nothing_is_sent(namespace: str) -> None:
    """Dramatiq's JSON encoder cannot carry `retry_when` or `throws`: they are options of an actor."""
    assert isinstance(BROKER, RedisBroker)
    messages = BrokerKeys(BROKER.namespace).queue_messages(QUEUE)
    before = BROKER.client.hlen(messages)
    for option in ({"retry_when": lambda retries, error: True}, {"throws": EmbeddingUnavailable}):
        with pytest.raises(TypeError, match="not JSON serializable"):
            memory_sync.send_with_options(kwargs=sync_kwargs(namespace), **option)
    assert BROKER.client.hlen(messages) == before


def test_throws_of_a_message_built_in_process_makes_its_error_final() -> None:
    message = memory_sync.message_with_options(kwargs={"key": "k", "value": 1}, throws=IndexUnavailable)
    policy = policy_for(BROKER, message)
    assert policy.is_final(IndexUnavailable("down"), 0)
    assert not policy.is_final(EmbeddingUnavailable("busy"), 0)
    assert not policy_for(BROKER, memory_sync.message(key="k", value=1)).is_final(IndexUnavailable("x"), 0)


# --- options per actor ---------------------------------------------------------------------------


def test_retry_when_of_the_actor_decides_instead_of_max_retries(
    worker: dramatiq.Worker,
    namespace: str,
    embedding_service: EmbeddingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[int, str]] = []

    def twice(retries: int, error: BaseException) -> bool:
        seen.append((retries, type(error).__name__))
        return retries < 2

    monkeypatch.setitem(memory_sync.options, "retry_when", twice)
    embedding_service.fail_next(503, count=10)
    message = memory_sync.send_with_options(kwargs=sync_kwargs(namespace), max_retries=0)  # retry_when wins
    failure_of(message)
    assert dead_letter(message.message_id).retries == 2
    assert len(embedding_service.embedding_requests) == 3
    assert {retries for retries, _ in seen} == {0, 1, 2}
    assert {name for _, name in seen} == {"EmbeddingUnavailable"}


def test_throws_of_the_actor_fails_its_error_at_once_without_telling_on_retry_exhausted(
    worker: dramatiq.Worker,
    namespace: str,
    embedding_service: EmbeddingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(memory_sync.options, "throws", (*PERMANENT_ERRORS, EmbeddingUnavailable))
    embedding_service.fail_next(503, count=5)
    message = memory_sync.send_with_options(
        kwargs=sync_kwargs(namespace), max_retries=5, on_retry_exhausted="test_retries_exhausted"
    )
    failure_of(message)
    assert dead_letter(message.message_id).retries == 0
    assert len(embedding_service.embedding_requests) == 1
    settle(worker)
    assert message.message_id not in _exhausted


@pytest.mark.parametrize("where", ["message", "actor"])
def test_on_retry_exhausted_receives_the_message_and_its_retries_when_they_run_out(
    worker: dramatiq.Worker,
    namespace: str,
    embedding_service: EmbeddingServer,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    embedding_service.fail_next(503, count=10)
    if where == "actor":
        monkeypatch.setitem(memory_sync.options, "on_retry_exhausted", "test_retries_exhausted")
        message = memory_sync.send_with_options(kwargs=sync_kwargs(namespace), max_retries=1)
    else:
        message = memory_sync.send_with_options(
            kwargs=sync_kwargs(namespace), max_retries=1, on_retry_exhausted="test_retries_exhausted"
        )
    failure_of(message)
    wait_until(lambda: message.message_id in _exhausted, 20, "the exhaustion actor")
    data, info = _exhausted[message.message_id]
    assert info == {"retries": 1, "max_retries": 1}  # as Dramatiq's Retries sends it
    assert (data["actor_name"], data["kwargs"]) == ("memory_sync", sync_kwargs(namespace))
    assert dead_letter(message.message_id).retries == 1


def test_retry_with_a_delay_raised_by_an_actor_waits_exactly_that_long(
    worker: dramatiq.Worker, message_lines: Callable[[str], list[dict[str, str]]]
) -> None:
    """memsync's own actors never raise Retry; an actor of the app's own, on memsync's broker, may."""
    message = asks_again.send(1500)
    assert result_of(message) == 2
    lines = message_lines(message.message_id)
    assert [(line["outcome"], line.get("error"), line.get("delay_ms")) for line in lines[:1]] == [
        ("retrying", "Retry", "1500")
    ]
    first, second = _attempts[message.message_id]
    assert second - first >= 1.5


# --- permanent errors and Retry-After ------------------------------------------------------------


def test_a_permanent_error_is_dead_lettered_at_once_whatever_the_options(
    worker: dramatiq.Worker,
    namespace: str,
    embedding_service: EmbeddingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(memory_sync.options, "retry_when", lambda retries, error: True)
    embedding_service.fail_next(400, count=5)
    message = memory_sync.send_with_options(
        kwargs=sync_kwargs(namespace), max_retries=10, on_retry_exhausted="test_retries_exhausted"
    )
    assert "EmbeddingRejected" in failure_of(message)
    assert dead_letter(message.message_id).retries == 0
    assert [request.status for request in embedding_service.embedding_requests] == [400]
    settle(worker)
    assert message.message_id not in _exhausted


def test_retry_after_longer_than_the_backoff_delays_the_retry_at_least_that_long(
    worker: dramatiq.Worker,
    namespace: str,
    embedding_service: EmbeddingServer,
    message_lines: Callable[[str], list[dict[str, str]]],
) -> None:
    embedding_service.fail_next(429, count=2, retry_after_s=1.5)
    message = memory_sync.send_with_options(kwargs=sync_kwargs(namespace), max_retries=1, max_backoff=100)
    failure_of(message)
    assert retry_delays(message_lines(message.message_id)) == [1500]  # over the message's max_backoff
    (gap,) = gaps_s(embedding_service)
    assert gap >= 1.5
    letter = dead_letter(message.message_id)
    assert letter.failed_at_ms - letter.message["options"]["requeue_timestamp"] >= 1500


# --- the policy alone: jitter, caps, Retry-After -------------------------------------------------

DRAWS = 300


@pytest.mark.parametrize("retries", [0, 1, 2, 3, 4])
def test_jitter_spreads_delays_between_the_backoff_and_twice_it(retries: int) -> None:
    policy = RetryPolicy(max_retries=20, min_backoff_ms=100, max_backoff_ms=1_000_000)
    low = 100 * 2**retries
    delays = [policy.delay_ms(EmbeddingUnavailable("busy"), retries) for _ in range(DRAWS)]
    assert all(delay is not None and low <= delay <= 2 * low for delay in delays)
    assert len(set(delays)) > DRAWS // 10  # not one value, nor a handful
    assert (
        min(d for d in delays if d is not None) < 1.25 * low
        and max(d for d in delays if d is not None) > 1.75 * low
    )


def test_a_jittered_delay_past_max_backoff_falls_between_half_of_it_and_it_as_in_dramatiq() -> None:
    policy = RetryPolicy(max_retries=20, min_backoff_ms=100, max_backoff_ms=1000)
    delays = {policy.delay_ms(EmbeddingUnavailable("busy"), 5) for _ in range(DRAWS)}  # 3,200-6,400 uncapped
    dramatiqs = {compute_backoff(5, factor=100, max_backoff=1000)[1] for _ in range(DRAWS)}
    for drawn in (delays, dramatiqs):
        assert all(delay is not None and 500 <= delay <= 1000 for delay in drawn) and len(drawn) > 10


def test_a_policy_without_jitter_is_exact() -> None:
    policy = RetryPolicy(max_retries=20, min_backoff_ms=100, max_backoff_ms=1000, jitter=False)
    for retries, expected in enumerate([100, 200, 400, 800, 1000, 1000]):
        assert {policy.delay_ms(EmbeddingUnavailable("busy"), retries) for _ in range(50)} == {expected}


def test_the_policy_honours_retry_after_up_to_an_hour_and_never_below_the_backoff() -> None:
    policy = RetryPolicy(min_backoff_ms=100, max_backoff_ms=1000, jitter=False)
    assert policy.delay_ms(EmbeddingUnavailable("429", retry_after_ms=5000), 0) == 5000
    assert policy.delay_ms(EmbeddingUnavailable("429", retry_after_ms=10), 0) == 100
    assert policy.delay_ms(EmbeddingUnavailable("429", retry_after_ms=10**9), 0) == MAX_RETRY_AFTER_MS


def test_the_policy_never_retries_a_permanent_error_and_stops_at_max_retries() -> None:
    policy = RetryPolicy(max_retries=10, retry_when=lambda retries, error: True)
    assert policy.delay_ms(EmbeddingRejected("400", status=400), 0) is None
    plain = RetryPolicy(max_retries=2)
    assert [plain.delay_ms(EmbeddingUnavailable("busy"), n) is None for n in range(4)] == [
        False,
        False,
        True,
        True,
    ]
    assert RetryPolicy(max_retries=None).delay_ms(EmbeddingUnavailable("busy"), 1000) is not None


def test_an_unexpected_error_is_logged_with_where_it_was_raised_and_never_its_text(
    worker: dramatiq.Worker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="memsync")
    message = has_a_bug.send("VALUE-IN-A-BUG-7f3a")
    failure_of(message)
    texts = [record.getMessage() for record in caplog.records if record.name.startswith("memsync")]
    bug = [text for text in texts if text.startswith(f"test_retries_has_a_bug[{message.message_id}] raised")]
    assert len(bug) == 1 and "KeyError" in bug[0] and "raise KeyError(value)" in bug[0], texts
    assert not [text for text in texts if "VALUE-IN-A-BUG-7f3a" in text]
