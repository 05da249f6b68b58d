"""The actors: validate the payload, call Memories, return the result. Thin on purpose."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from actors import state
from actors.deadletter import scrub
from actors.errors import PERMANENT_ERRORS
from actors.payloads import RollbackPayload, SyncPayload, parse
from actors.runtime import Runtime
from kvstore import WriteMeta, WriteResult

__all__ = ["JOBS", "memory_rollback", "memory_sync", "perform", "run_rollback", "run_sync"]

logger = logging.getLogger("memsync.actors")


def run_sync(runtime: Runtime, payload: SyncPayload, meta: WriteMeta) -> dict[str, Any]:
    """The MEMORY_SYNC job: `{"status": "success", "key", "version", ...}`."""
    result = runtime.memories.sync(
        payload.key,
        payload.value,
        namespace=payload.namespace,
        embed=payload.embed,
        ttl_ms=payload.ttl_ms,
        meta=meta,
    )
    return _answer("success", payload.key, result)


def run_rollback(runtime: Runtime, payload: RollbackPayload, meta: WriteMeta) -> dict[str, Any]:
    """The MEMORY_ROLLBACK job: `{"status": "rolled_back", "key", "version", ...}`."""
    result = runtime.memories.rollback(
        payload.key, namespace=payload.namespace, version=payload.version, meta=meta
    )
    return _answer("rolled_back", payload.key, result)


def _answer(status: str, key: str, result: WriteResult) -> dict[str, Any]:
    current = result.current
    return {
        "status": status,
        "key": key,
        "version": None if current is None else current.version,
        "namespace": None if current is None else current.namespace,
        "outcome": result.outcome.value,
    }


Runner = Callable[[Runtime, Any, WriteMeta], dict[str, Any]]

#: Each job: its payload and what runs it. The actors and the one-off runs share this table.
JOBS: dict[str, tuple[type[SyncPayload] | type[RollbackPayload], Runner]] = {
    "MEMORY_SYNC": (SyncPayload, run_sync),
    "MEMORY_ROLLBACK": (RollbackPayload, run_rollback),
}


def perform(
    job: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    meta: WriteMeta,
    retries: int,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Validate the payload and run the job; `retries` is how many attempts failed before this one.

    When the job fails for good, what it wrote is taken back so nothing stays half-applied.
    `runtime` defaults to this process's.
    """
    model, runner = JOBS[job]
    payload, runtime = parse(model, args, kwargs), runtime or state.runtime()
    try:
        return runner(runtime, payload, meta)
    except Exception as error:
        if runtime.policy.is_final(error, retries):
            _undo(runtime, payload.key, payload.namespace, meta.msg_id)
        _scrub_in_place(error, runtime.secrets)  # Dramatiq logs it and stores str(error) as the result
        raise


def _undo(runtime: Runtime, key: str, namespace: str | None, msg_id: str) -> None:
    try:
        if runtime.memories.undo(key, msg_id, namespace=namespace):
            logger.warning("undid the write of message %s to key %r: it failed for good", msg_id, key)
    except Exception as error:  # the original failure is the one to report
        logger.error(
            "could not finish undoing message %s (%s); run `memsync reconcile`", msg_id, type(error).__name__
        )


def _scrub_in_place(error: BaseException, secrets: list[str]) -> None:
    error.args = tuple(scrub(arg, secrets) if isinstance(arg, str) else arg for arg in error.args)


def _current_meta() -> tuple[WriteMeta, int]:
    message = CurrentMessage.get_current_message()
    if message is None:
        return WriteMeta(), 0
    return WriteMeta(message.message_id, message.message_timestamp), int(message.options.get("retries", 0))


@dramatiq.actor(actor_name="memory_sync", queue_name=state.settings().queue, throws=PERMANENT_ERRORS)
def memory_sync(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Keep `value` as the key's new version, and its embedding in step when `embed` is true."""
    return perform("MEMORY_SYNC", args, kwargs, *_current_meta())


@dramatiq.actor(actor_name="memory_rollback", queue_name=state.settings().queue, throws=PERMANENT_ERRORS)
def memory_rollback(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Restore the key's previous version (or `version`) as a new version."""
    return perform("MEMORY_ROLLBACK", args, kwargs, *_current_meta())
