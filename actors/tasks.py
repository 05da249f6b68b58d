"""The actors: validate the payload, call Memories, return the result. Thin on purpose.

A single sync goes through this process's coalescer, so concurrent ones share a batch; the batch
actor hands its items to `Memories.sync_many` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from actors import state
from actors.batch import perform_batch
from actors.errors import PERMANENT_ERRORS
from actors.outcomes import answer, scrub_in_place, undo
from actors.payloads import RollbackPayload, SyncPayload, parse
from actors.retry import RetryPolicy, policy_for
from actors.runtime import Runtime
from kvstore import WriteMeta
from vectorstore import SyncItem

__all__ = [
    "JOBS",
    "memory_rollback",
    "memory_sync",
    "memory_sync_batch",
    "perform",
    "run_rollback",
    "run_sync",
]


def run_sync(runtime: Runtime, payload: SyncPayload, meta: WriteMeta) -> dict[str, Any]:
    """The MEMORY_SYNC job: `{"status": "success", "key", "version", ...}`."""
    result = runtime.coalescer.sync(_item(payload, meta))
    return answer("success", payload.key, result)


def _item(payload: SyncPayload, meta: WriteMeta) -> SyncItem:
    return SyncItem(
        payload.key, payload.value, payload.namespace, payload.embed, payload.ttl_ms, meta, payload.metadata
    )


def run_rollback(runtime: Runtime, payload: RollbackPayload, meta: WriteMeta) -> dict[str, Any]:
    """The MEMORY_ROLLBACK job: `{"status": "rolled_back", "key", "version", ...}`."""
    result = runtime.memories.rollback(
        payload.key, namespace=payload.namespace, version=payload.version, meta=meta
    )
    return answer("rolled_back", payload.key, result)


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
    *,
    policy: RetryPolicy | None = None,
) -> dict[str, Any]:
    """Validate the payload and run the job; `retries` is how many attempts failed before this one.

    When the job fails for good (by `policy`, the message's), what it wrote is taken back so
    nothing stays half-applied. `runtime` and `policy` default to this process's.
    """
    model, runner = JOBS[job]
    payload, runtime = parse(model, args, kwargs), runtime or state.runtime()
    try:
        return runner(runtime, payload, meta)
    except Exception as error:
        if (policy or runtime.policy).is_final(error, retries):
            undo(runtime, payload.key, payload.namespace, meta.msg_id, error)
        scrub_in_place(error, runtime.secrets)  # Dramatiq logs it and stores str(error) as the result
        raise


def _current() -> dict[str, Any]:
    """The running message's write stamp, retries so far and retry policy, as `perform`'s arguments."""
    message = CurrentMessage.get_current_message()
    if message is None:
        return {"meta": WriteMeta(), "retries": 0}
    return {
        "meta": WriteMeta(message.message_id, message.message_timestamp),
        "retries": int(message.options.get("retries", 0)),
        "policy": policy_for(state.broker(), message),
    }


@dramatiq.actor(actor_name="memory_sync", queue_name=state.settings().queue, throws=PERMANENT_ERRORS)
def memory_sync(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Keep `value` as the key's new version, and its embedding in step when `embed` is true."""
    return perform("MEMORY_SYNC", args, kwargs, **_current())


@dramatiq.actor(actor_name="memory_sync_batch", queue_name=state.settings().queue, throws=PERMANENT_ERRORS)
def memory_sync_batch(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Sync up to 1,000 items at once; a result per item, in order. A retry re-runs only the unfinished."""
    return perform_batch(args, kwargs, message=CurrentMessage.get_current_message(), **_current())


@dramatiq.actor(actor_name="memory_rollback", queue_name=state.settings().queue, throws=PERMANENT_ERRORS)
def memory_rollback(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Restore the key's previous version (or `version`) as a new version."""
    return perform("MEMORY_ROLLBACK", args, kwargs, **_current())
