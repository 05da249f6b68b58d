"""What a worker logs: one line per message (key, version, outcome, attempt, milliseconds), never a value.

A memory's value is its user's personal data. Dramatiq's worker logs each failed message with its
arguments (`Failed to process message memory_sync(key='x', value='...')`), at ERROR with a traceback;
`RedactMessages` rewrites such records to name the message by actor and id only, and drops the
failure lines that `describe` already gives in one line. `JsonLines` formats records as JSON objects
for log platforms (`MEMSYNC_LOG_FORMAT=json`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware
from dramatiq.worker import ConsumerThread

__all__ = [
    "JsonLines",
    "MessageLog",
    "RedactMessages",
    "attempt",
    "describe",
    "redact_dramatiq_records",
    "redacted",
]

logger = logging.getLogger("memsync.messages")

#: Dramatiq's loggers whose records may carry a message (with its arguments).
DRAMATIQ_LOGGERS = (
    "dramatiq.worker.WorkerThread",
    "dramatiq.middleware.retries.Retries",
    "dramatiq.middleware.time_limit.TimeLimit",
    "dramatiq.middleware.age_limit.AgeLimit",
    "dramatiq.broker.Broker",
)
#: What Dramatiq logs for a failed message; memsync's own line replaces it.
_FAILURE_LINES = (
    "Failed to process message %s with unhandled exception.",
    "Failed to process message %s with expected exception %s.",
)
#: The actors whose messages name a key.
_KEYED = frozenset({"memory_sync", "memory_rollback"})
#: How much of a key a line shows.
KEY_SHOWN = 100
#: When each running message of this process started (monotonic ns), by message id.
_started: dict[str, int] = {}


def redacted(message: Any) -> str:
    """A message named without its arguments: `memory_sync[<message id>]`."""
    return f"{message.actor_name}[{message.message_id}]"


def describe(message: Any, **fields: Any) -> str:
    """The line of one message: actor, id, key (never the value) and the given fields."""
    parts = [redacted(message)]
    key = _key_of(message)
    if key is not None:  # keys run to 512 characters: a line shows their start
        parts.append(f"key={key[:KEY_SHOWN]!r}" + ("..." if len(key) > KEY_SHOWN else ""))
    parts.extend(f"{name}={value}" for name, value in fields.items() if value is not None)
    started = _started.get(message.message_id)
    if started is not None:
        parts.append(f"ms={(time.monotonic_ns() - started) // 1_000_000}")
    return " ".join(parts)


def _key_of(message: Any) -> str | None:
    """The key of a sync or rollback (by name, or first); other actors' arguments are not ours to show."""
    if message.actor_name not in _KEYED:
        return None
    key = message.kwargs.get("key") if isinstance(message.kwargs, dict) else None
    if key is None and message.args:
        key = message.args[0]
    return key if isinstance(key, str) else None


class RedactMessages(logging.Filter):
    """Names messages in Dramatiq's records by actor and id; drops its failure lines (memsync has its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in _FAILURE_LINES:
            return False
        if isinstance(record.args, tuple) and any(_is_message(arg) for arg in record.args):
            record.args = tuple(redacted(arg) if _is_message(arg) else arg for arg in record.args)
        return True


def _is_message(value: Any) -> bool:
    return isinstance(value, dramatiq.Message | dramatiq.MessageProxy)


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the exception's type when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = record.exc_info[0].__name__
        return json.dumps(line, default=str)

    def converter(self, seconds: float | None) -> time.struct_time:
        return time.gmtime(seconds)


_FILTER = RedactMessages()


def redact_dramatiq_records() -> None:
    """Name messages by actor and id in every record Dramatiq logs in this process."""
    for name in DRAMATIQ_LOGGERS:
        target = logging.getLogger(name)
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)


class MessageLog(Middleware):
    """Logs one line per message that succeeded, with its outcome; the retry middleware logs failures.

    It comes before the retry middleware in the broker's list: Dramatiq runs `after_` hooks from last to
    first, so the retry middleware logs a failure (with its milliseconds) before this one forgets it.
    """

    def __init__(self, log_format: str = "text") -> None:
        self.log_format = log_format

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        redact_dramatiq_records()
        if self.log_format == "json":  # Dramatiq's CLI has set up this worker process's handlers by now
            for handler in logging.getLogger().handlers:
                handler.setFormatter(JsonLines())

    def after_consumer_thread_boot(self, broker: dramatiq.Broker, thread: ConsumerThread) -> None:
        # A consumer's logger is named after its queue; it names a message whose ack meets a connection error.
        if _FILTER not in thread.logger.filters:
            thread.logger.addFilter(_FILTER)

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        _started[message.message_id] = time.monotonic_ns()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            logger.info(describe(message, attempt=attempt(message), **_outcome(result)))
        _started.pop(message.message_id, None)

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        _started.pop(message.message_id, None)


def attempt(message: Any) -> int:
    """Which attempt this is: 1 for the first delivery, 2 for the first retry, ..."""
    return int(message.options.get("retries", 0)) + 1


def _outcome(result: Any) -> dict[str, Any]:
    if not isinstance(result, dict):
        return {}
    if isinstance(result.get("counts"), dict):  # a batch: `{"status", "results": [...], "counts"}`
        counts = {name: n for name, n in result["counts"].items() if n}
        listed = ",".join(f"{name}:{n}" for name, n in sorted(counts.items()))
        return {"items": sum(counts.values()), "outcomes": listed}
    return {"version": result.get("version"), "outcome": result.get("outcome")}
