"""What the reliability scenarios send, the model of what it must do, and a view of the broker's queues.

A scenario sends `Op`s through the real actors. The expected end state comes from `Model`, which
replays ops with write.lua's rules (every applied write is a new version; a rollback restores the
previous or a retained version; a rollback of a first version deletes the key). `Chains` sends each
key's ops one after another, the next once the previous has a result, so that the model is exact
whatever the worker goes through. `broker_view` tells where each message is: still held by the
broker (queued, delayed, or fetched and unacknowledged), and which worker process fetched it.
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import dramatiq
import redis
from dramatiq.results import ResultFailure, ResultMissing, ResultTimeout

import actors
from actors import state
from actors.deadletter import DeadLetters
from kvstore import Keys, MemoryStore, Record
from tests.reliability.invariants import Expectation, KeyState
from tests.support.unchecked import send_unchecked

__all__ = [
    "BrokerView",
    "Chains",
    "KeyModel",
    "Model",
    "Op",
    "Sent",
    "broker_view",
    "check_dead_letter_errors",
    "check_results",
    "drive",
    "invalid",
    "mixed_chains",
    "rollback",
    "send",
    "settle",
    "stored_versions",
    "sync",
]

OpKind = Literal["sync", "rollback", "invalid"]


@dataclass(frozen=True)
class Op:
    """One message: a sync, a rollback (to the previous version, or `version`), or an invalid sync."""

    kind: OpKind
    key: str
    value: Any = None
    embed: bool = True
    version: int | None = None
    metadata: dict[str, Any] | None = None


def sync(key: str, value: Any, *, embed: bool = True, metadata: dict[str, Any] | None = None) -> Op:
    return Op("sync", key, value, embed, metadata=metadata)


def long_text(key: str, topic: str, sentences: int) -> str:
    """A text of about 12 tokens a sentence: past 8,191 tokens it is embedded as several chunks."""
    lines = [f"Note {n % 7} on {key}: the {topic} report was filed. " for n in range(sentences)]
    return "".join(lines) + f"The last word on {key} is {topic}."


def rollback(key: str, version: int | None = None) -> Op:
    return Op("rollback", key, version=version)


def invalid(key: str) -> Op:
    """A sync whose `embed` is not a bool: it must be dead-lettered at once, with nothing written."""
    return Op("invalid", key, "a memory that is never kept")


@dataclass
class Sent:
    """A message sent for an op, and what became of it (the first result seen, or the failure)."""

    op: Op
    message: dramatiq.Message[dict[str, Any]]
    expected_error: str | None = None  # the error it must fail with, by the model; None: it applies
    expected_version: int | None = None
    result: dict[str, Any] | None = None
    failure: str | None = None  # the failed actor's error type
    done_at: float | None = None  # time.monotonic() when the result was first seen

    @property
    def message_id(self) -> str:
        return self.message.message_id

    @property
    def order(self) -> tuple[int, str]:
        """What orders messages to one key (write.lua): the send time in ms, ties broken by id."""
        return self.message.message_timestamp, self.message.message_id

    @property
    def done(self) -> bool:
        return self.done_at is not None

    @property
    def outcome(self) -> str | None:
        return None if self.result is None else str(self.result["outcome"])


def send(op: Op, namespace: str) -> Sent:
    """Send `op` through the real actors (as an app does) and return it as sent."""
    if op.kind == "sync":
        message = actors.memory_sync.send(
            key=op.key, value=op.value, embed=op.embed, namespace=namespace, metadata=op.metadata
        )
    elif op.kind == "invalid":
        message = send_unchecked(
            actors.memory_sync, key=op.key, value=op.value, embed="yes", namespace=namespace
        )
    elif op.version is None:
        message = actors.memory_rollback.send(key=op.key, namespace=namespace)
    else:
        message = actors.memory_rollback.send(key=op.key, version=op.version, namespace=namespace)
    return Sent(op, message)


def settle(sent: Sent, *, timeout_ms: int | None = None) -> bool:
    """Record the result (or failure) stored for `sent`, waiting up to `timeout_ms`; True once done."""
    if sent.done:
        return True
    try:
        if timeout_ms is None:
            result = sent.message.get_result()
        else:
            result = sent.message.get_result(block=True, timeout=timeout_ms)
    except (ResultMissing, ResultTimeout):
        return False
    except ResultFailure as failure:
        sent.failure = str(failure.orig_exc_type)
    else:
        sent.result = result
    sent.done_at = time.monotonic()
    return True


# --- the model -----------------------------------------------------------------------------------


@dataclass
class KeyModel:
    """The versions one key goes through when ops apply in order, by write.lua's rules."""

    history_length: int = 10
    versions: list[KeyState] = field(default_factory=list)

    def apply(self, op: Op) -> str | None:
        """Apply `op` as the key's newest message; returns the error it must fail with, else None."""
        new = self._next(op)
        if isinstance(new, str):
            return new
        self.versions.append(new)
        return None

    def _next(self, op: Op) -> KeyState | str:
        number = len(self.versions) + 1
        if op.kind == "invalid":
            return "InvalidPayload"
        if op.kind == "sync":
            return KeyState(op.value, number, op.embed, metadata=op.metadata or {})
        if not self.versions:
            return "KeyNotFound"
        source = self._retained(op.version)
        if isinstance(source, str):
            return source
        if source is None:  # a single version: rolling it back deletes the key
            return KeyState(None, number, False, True)
        embed = source.embed and not source.deleted
        return KeyState(source.value, number, embed, source.deleted, source.metadata)

    def _retained(self, version: int | None) -> KeyState | str | None:
        current = len(self.versions)
        if version is None:
            if current >= 2:
                return self.versions[-2]
            return "NothingToRollBack" if self.versions[-1].deleted else None
        if max(1, current - self.history_length) <= version < current:
            return self.versions[version - 1]
        return "VersionNotFound"


@dataclass
class Model:
    """The end state one namespace must reach: a `KeyModel` per key and the messages that must fail."""

    namespace: str
    history_length: int = 10
    keys: dict[str, KeyModel] = field(default_factory=dict)
    dead: dict[str, str] = field(default_factory=dict)  # message id -> the error it must fail with

    def record(self, sent: Sent) -> None:
        """Apply `sent` as the newest message of its key; it must have been sent after the earlier ones."""
        model = self.keys.setdefault(sent.op.key, KeyModel(self.history_length))
        error = model.apply(sent.op)
        sent.expected_error = error
        if error is None:
            sent.expected_version = len(model.versions)
        else:
            self.dead[sent.message_id] = error

    def expectation(self) -> Expectation:
        expected = Expectation(self.namespace, dead_message_ids=set(self.dead))
        for key, model in self.keys.items():
            if model.versions:
                expected.keys[key] = model.versions[-1]
        return expected


def check_dead_letter_errors(dead_letters: DeadLetters, expected: Mapping[str, str]) -> None:
    """Each expected dead letter failed with its expected error, and its reason names that error."""
    for message_id, error in expected.items():
        letter = dead_letters.get(message_id)
        assert letter is not None, f"message {message_id} ({error}) was not dead-lettered"
        assert (letter.error, letter.reason.startswith(f"{error}: ")) == (error, True), (
            f"dead letter {message_id}: {letter.error} {letter.reason!r}, expected {error}"
        )


def check_results(sent: Iterable[Sent], outcomes: tuple[str, ...]) -> None:
    """Each message that must fail failed with its error; each other has a result: `outcomes`, its version."""
    for one in sent:
        if one.expected_error is not None:
            assert (one.failure, one.result) == (one.expected_error, None), one
        else:
            assert one.result is not None, one
            assert (one.outcome in outcomes, one.result["version"]) == (True, one.expected_version), one


def stored_versions(store: MemoryStore, key: str, namespace: str) -> list[Record]:
    """Every retained version of a key, oldest first, the current one last."""
    head = store.record(key, namespace=namespace)
    assert head is not None, f"{key!r} was never written"
    return [*reversed(store.history(key, namespace=namespace)), head]


def mixed_chains(rng: random.Random, keys: int, parts: int = 1) -> dict[str, list[Op]]:
    """A chain of ops per key, `parts` pieces drawn from `rng`: syncs, rollbacks, messages that must fail.

    Every path of a sync and a rollback is there: a new text, the same text again (no embedding
    call), an embedded value replaced by a plain one and back, a rollback that deletes the key and
    one that restores it, a rollback to a named version, one to a version never kept, an invalid
    payload; a long text embedded as several chunks replaced by a shorter one (fewer chunks) and
    restored; a change of metadata alone (a relabel, no embedding call).
    """
    templates: list[Callable[[str], list[Op]]] = [
        lambda k: [sync(k, f"{k} likes tea"), sync(k, f"{k} likes coffee"), rollback(k)],
        lambda k: [sync(k, f"{k} reads novels"), sync(k, {"plain": k}, embed=False), rollback(k)],
        lambda k: [sync(k, f"{k} walks daily"), rollback(k), rollback(k)],
        lambda k: [sync(k, f"{k} plays chess"), sync(k, f"{k} plays chess"), rollback(k, version=1)],
        lambda k: [sync(k, f"{k} owns a cat"), rollback(k, version=99), sync(k, f"{k} owns a dog")],
        lambda k: [invalid(k), sync(k, f"{k} sings jazz"), sync(k, f"{k} sings blues"), rollback(k)],
        lambda k: [
            sync(k, long_text(k, "tea", 2_000), metadata={"kind": "long", "size": 3}),
            sync(k, long_text(k, "coffee", 900), metadata={"kind": "long", "size": 2}),
            rollback(k),
        ],
        lambda k: [
            sync(k, f"{k} keeps bees", metadata={"kind": "fact"}),
            sync(k, f"{k} keeps bees", metadata={"kind": "episode", "year": 2026}),
            rollback(k),
        ],
    ]
    names = [f"key-{i:02d}" for i in range(keys)]
    return {key: [op for _ in range(parts) for op in rng.choice(templates)(key)] for key in names}


# --- sending in order ----------------------------------------------------------------------------


class Chains:
    """Sends each key's ops in order, each once the one before has a result, recording them in `model`.

    Different keys run in parallel; within a key nothing overtakes, so `model` is exact.
    """

    def __init__(self, model: Model, chains: Mapping[str, Iterable[Op]]) -> None:
        self.model = model
        self.waiting = {key: deque(ops) for key, ops in chains.items()}
        self.running: dict[str, Sent] = {}
        self.sent: list[Sent] = []

    @property
    def done(self) -> bool:
        return not self.running and not any(self.waiting.values())

    def step(self) -> None:
        """Collect the results stored since the last step and send the ops they unblock."""
        for key, sent in list(self.running.items()):
            if settle(sent):
                del self.running[key]
        for key, ops in self.waiting.items():
            if key not in self.running and ops:
                sent = send(ops.popleft(), self.model.namespace)
                self.model.record(sent)
                self.running[key] = sent
                self.sent.append(sent)

    def by_id(self) -> dict[str, Sent]:
        return {sent.message_id: sent for sent in self.sent}


def drive(step: Callable[[], None], until: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Call `step` every 50 ms until `until()` holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        step()
        if until():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


# --- the broker ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerView:
    """Where the broker's messages are at one moment, by Dramatiq message id."""

    held: frozenset[str]  # still in the broker: queued, delayed, or fetched and not acknowledged
    fetched: Mapping[str, frozenset[str]]  # worker process (broker id) -> messages it has not acked

    def fetched_by(self, broker_ids: Iterable[str]) -> frozenset[str]:
        return frozenset().union(*(self.fetched.get(broker_id, frozenset()) for broker_id in broker_ids))

    @property
    def queued(self) -> frozenset[str]:
        """Held and fetched by no worker: waiting in a queue for the next fetch."""
        return self.held - self.fetched_by(self.fetched)


def broker_view(client: redis.Redis) -> BrokerView:
    """Which messages the queue and its delay queue hold, and who fetched them, read in one transaction."""
    keys, queue = Keys(state.settings().prefix).broker_keys(), state.settings().queue
    acks = [_text(name) for name in client.scan_iter(match=f"{keys.acks_prefix()}*", count=1000)]
    pipe = client.pipeline(transaction=True)
    for name in (keys.queue_messages(queue), keys.delay_messages(queue)):
        pipe.hgetall(name)
    for name in acks:
        pipe.smembers(name)
    answers = pipe.execute()
    ids = {
        _text(rid): str(json.loads(data)["message_id"]) for held in answers[:2] for rid, data in held.items()
    }
    fetched: dict[str, frozenset[str]] = {}
    for name, members in zip(acks, answers[2:], strict=True):
        broker_id = name.removeprefix(keys.acks_prefix()).split(".", 1)[0]
        mine = frozenset(ids[rid] for rid in map(_text, members) if rid in ids)
        fetched[broker_id] = fetched.get(broker_id, frozenset()) | mine
    return BrokerView(frozenset(ids.values()), fetched)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
