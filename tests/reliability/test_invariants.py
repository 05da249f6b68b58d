"""The invariant checker itself: it passes a consistent state and names each kind of breakage."""

from __future__ import annotations

import pytest

from actors import state
from actors.deadletter import DeadLetters
from tests.reliability.invariants import Expectation, check_invariants
from vectorstore import IndexEntry, Memories


@pytest.fixture
def memories() -> Memories:
    return state.runtime().memories


@pytest.fixture
def dead_letters() -> DeadLetters:
    return state.runtime().dead_letters


def _synced(memories: Memories, namespace: str) -> Expectation:
    expected = Expectation(namespace)
    for key, value in [("a", "a cat"), ("b", "a dog"), ("a", "a bird")]:
        memories.sync(key, value, embed=True, namespace=namespace)
        expected.sync(key, value)
    return expected


def test_a_consistent_state_passes(memories: Memories, dead_letters: DeadLetters, namespace: str) -> None:
    counts = check_invariants(memories, dead_letters, _synced(memories, namespace))
    assert counts["keys"] == 2


def test_a_message_applied_twice_is_caught(
    memories: Memories, dead_letters: DeadLetters, namespace: str
) -> None:
    expected = _synced(memories, namespace)
    memories.sync("a", "a bird", embed=True, namespace=namespace)  # a second application, as a new version
    with pytest.raises(AssertionError, match="'a'"):
        check_invariants(memories, dead_letters, expected)


def test_a_stale_vector_is_caught(memories: Memories, dead_letters: DeadLetters, namespace: str) -> None:
    expected = _synced(memories, namespace)
    memories.index.relabel([IndexEntry(namespace, "a", 1, "old")])
    with pytest.raises(AssertionError, match="stale"):
        check_invariants(memories, dead_letters, expected)


def test_an_unexpected_dead_letter_is_caught(
    memories: Memories, dead_letters: DeadLetters, namespace: str
) -> None:
    expected = _synced(memories, namespace)
    expected.dead_message_ids.add("never-sent")
    with pytest.raises(AssertionError, match="dead letters"):
        check_invariants(memories, dead_letters, expected)
