"""Waiting for an actor's stored result, or its failure, as an app does."""

from __future__ import annotations

from typing import Any

import dramatiq
import pytest
from dramatiq.results import ResultFailure

__all__ = ["WAIT_MS", "failure_of", "result_of"]

WAIT_MS = 20_000


def result_of(message: dramatiq.Message[Any]) -> Any:
    """The message's result, waiting up to WAIT_MS."""
    return message.get_result(block=True, timeout=WAIT_MS)


def failure_of(message: dramatiq.Message[Any]) -> str:
    """The failure stored for the message (the test fails if it succeeded)."""
    with pytest.raises(ResultFailure) as caught:
        result_of(message)
    return str(caught.value)
