"""The batch job: many syncs in one message, a result per item in order.

Items are checked one by one, so a bad item fails alone. Item `n` writes as message
`{message id}:{n}` at the message's send time, so a redelivered or retried batch is a duplicate
item by item. When some items fail in a way worth retrying, the answers of the finished ones ride
along in the retried message's options, and the retry runs only the others.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import dramatiq

from actors import state
from actors.deadletter import scrub
from actors.errors import is_permanent
from actors.outcomes import answer, scrub_in_place, undo
from actors.payloads import BatchPayload, parse, parse_item
from actors.retry import RetryPolicy
from actors.runtime import Runtime
from kvstore import WriteMeta, WriteResult
from vectorstore import ItemResult, SyncItem

__all__ = ["DONE_OPTION", "perform_batch"]

#: The message option that carries the answers of a batch's finished items into its retry.
DONE_OPTION = "memsync_done"

Answers = dict[str, dict[str, Any]]


def perform_batch(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    meta: WriteMeta,
    retries: int,
    *,
    message: dramatiq.Message[Any] | dramatiq.MessageProxy | None = None,
    runtime: Runtime | None = None,
    policy: RetryPolicy | None = None,
) -> dict[str, Any]:
    """Run a MEMORY_SYNC_BATCH job: `{"status": "success", "results": [...], "counts": {...}}`.

    Raises the first failure worth retrying when any item has one, after keeping the other
    items' answers in `message` for the retry; when that failure is final, the writes of the
    unfinished items are taken back first.
    """
    payload = parse(BatchPayload, args, kwargs)
    runtime = runtime or state.runtime()
    done: Answers = dict(message.options.get(DONE_OPTION, {})) if message is not None else {}
    items = _unfinished(payload, meta, done, runtime)
    outcomes = runtime.memories.sync_many(list(items.values()), skip_unchanged=payload.skip_unchanged)
    failed = _settle(items, outcomes, done, runtime)
    if failed:
        _fail(failed, done, (policy or runtime.policy).is_final(failed[0][1], retries), message, runtime)
    results = [done[str(n)] for n in range(len(payload.items))]
    return {"status": "success", "results": results, "counts": _counts(results)}


def _unfinished(
    payload: BatchPayload, meta: WriteMeta, done: Answers, runtime: Runtime
) -> dict[int, SyncItem]:
    """The items still to run, by position; an invalid one gets its failed answer in `done`."""
    items: dict[int, SyncItem] = {}
    for n, fields in enumerate(payload.items):
        if str(n) in done:
            continue
        try:
            item = parse_item(fields)
        except Exception as error:
            done[str(n)] = _failed(fields, error, runtime)
            continue
        items[n] = SyncItem(
            item.key, item.value, item.namespace, item.embed, item.ttl_ms, meta.item(n), item.metadata
        )
    return items


def _settle(
    items: dict[int, SyncItem], outcomes: list[ItemResult], done: Answers, runtime: Runtime
) -> list[tuple[SyncItem, Exception]]:
    """Record each finished item's answer in `done`; the items whose failure is worth retrying."""
    failed: list[tuple[SyncItem, Exception]] = []
    for (n, item), outcome in zip(items.items(), outcomes, strict=True):
        if isinstance(outcome, WriteResult):
            done[str(n)] = answer("success", item.key, outcome)
        elif is_permanent(outcome):
            done[str(n)] = _failed({"key": item.key, "namespace": item.namespace}, outcome, runtime)
        else:
            failed.append((item, outcome))
    return failed


def _fail(
    failed: list[tuple[SyncItem, Exception]],
    done: Answers,
    final: bool,
    message: dramatiq.Message[Any] | dramatiq.MessageProxy | None,
    runtime: Runtime,
) -> None:
    first = failed[0][1]
    if final:
        for item, _ in failed:
            if item.meta is not None:
                undo(runtime, item.key, item.namespace, item.meta.msg_id, first)
    if message is not None:  # a retry runs only the others; a dead letter (and metrics) see what finished
        message.options[DONE_OPTION] = done
    scrub_in_place(first, runtime.secrets)
    raise first


def _failed(fields: Any, error: BaseException, runtime: Runtime) -> dict[str, Any]:
    known = fields if isinstance(fields, dict) else {}
    key, namespace = known.get("key"), known.get("namespace")
    return {
        "status": "failed",
        "key": key if isinstance(key, str) else None,
        "namespace": namespace if isinstance(namespace, str) else None,
        "error": scrub(f"{type(error).__name__}: {error}", runtime.secrets),
    }


def _counts(results: list[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(r["outcome"] if r["status"] == "success" else "failed" for r in results)
    return {name: counts.get(name, 0) for name in ("applied", "unchanged", "duplicate", "stale", "failed")}
