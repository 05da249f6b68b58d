"""What a job gives back, and what it takes back when it fails for good."""

from __future__ import annotations

import logging
from typing import Any

from actors.deadletter import scrub
from actors.runtime import Runtime
from kvstore import WriteResult

__all__ = ["answer", "scrub_in_place", "undo"]

logger = logging.getLogger("memsync.actors")


def answer(status: str, key: str, result: WriteResult) -> dict[str, Any]:
    current = result.current
    return {
        "status": status,
        "key": key,
        "version": None if current is None else current.version,
        "namespace": None if current is None else current.namespace,
        "outcome": result.outcome.value,
    }


def undo(runtime: Runtime, key: str, namespace: str | None, msg_id: str, cause: BaseException) -> None:
    """Take back what message `msg_id` wrote to `key`, which failed for good with `cause`."""
    try:
        if runtime.memories.undo(key, msg_id, namespace=namespace):
            logger.warning("undid the write of message %s to key %r: it failed for good", msg_id, key)
    except Exception as error:  # the original failure is the one to report
        if type(error) is type(cause):  # the failure itself (Redis out of reach, say) already says it
            logger.info("message %s: the undo met the job's own failure (%s)", msg_id, type(error).__name__)
            return
        logger.error(
            "could not finish undoing message %s (%s); run `memsync reconcile`", msg_id, type(error).__name__
        )


def scrub_in_place(error: BaseException, secrets: list[str]) -> None:
    error.args = tuple(scrub(arg, secrets) if isinstance(arg, str) else arg for arg in error.args)
