"""One-off runs: `WORKER_JOB=MEMORY_SYNC WORKER_PAYLOAD='{...}' python -m actors` runs one job in-process."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, TextIO

from actors import state
from actors.errors import InvalidPayload
from actors.failures import explain
from kvstore import WriteMeta

#: The jobs a one-off run knows; `actors.tasks.JOBS` runs them (imported on use: it reads the settings).
JOB_NAMES = ("MEMORY_ROLLBACK", "MEMORY_SYNC")

__all__ = ["main"]


def main(environ: Mapping[str, str] = os.environ, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run WORKER_JOB with WORKER_PAYLOAD once and print the JSON result.

    Exits 0, 1 when the job failed, or 2 when the input is bad.
    """
    try:
        job, fields = _read_job(environ)
    except InvalidPayload as problem:
        print(f"error: {problem}", file=err)
        return 2
    try:
        result = _run(job, fields)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what the run started is stopped already
        print("error: interrupted", file=err)
        return 130
    except Exception as problem:
        line, status = explain(problem)
        print(f"error: {line}", file=err)
        return status
    print(json.dumps(result), file=out)
    return 0


def _read_job(environ: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    name = environ.get("WORKER_JOB", "")
    if name not in JOB_NAMES:
        known = ", ".join(JOB_NAMES)
        raise InvalidPayload(f"WORKER_JOB={name!r} is not a job; expected one of {known}")
    text = environ.get("WORKER_PAYLOAD")
    if text is None:
        raise InvalidPayload("WORKER_PAYLOAD is not set; it must be a JSON object")
    return name, _json_object(text)


def _json_object(text: str) -> dict[str, Any]:
    def refuse(constant: str) -> Any:
        raise InvalidPayload(f"WORKER_PAYLOAD is not valid JSON: {constant} is not a JSON value")

    try:
        fields = json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as problem:
        raise InvalidPayload(f"WORKER_PAYLOAD is not valid JSON: {problem}") from None
    except ValueError:  # the only other one: an integer longer than sys.get_int_max_str_digits()
        raise InvalidPayload("WORKER_PAYLOAD holds an integer too long to read") from None
    except RecursionError:
        raise InvalidPayload("WORKER_PAYLOAD is nested too deeply to read") from None
    if not isinstance(fields, dict):
        raise InvalidPayload(f"WORKER_PAYLOAD must be a JSON object, not {type(fields).__name__}")
    return fields


def _run(job: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Run with the worker's retry policy, in-process; start the local stack when no URLs are set."""
    from actors.local import local_stack
    from actors.tasks import perform

    settings = state.settings()
    stack = local_stack(settings) if settings.is_local() else nullcontext()
    meta = WriteMeta(f"oneoff-{os.getpid()}-{time.time_ns()}", time.time_ns() // 1_000_000)
    with stack:
        retries = 0
        while True:
            try:
                return perform(job, (), fields, meta, retries)
            except Exception as problem:
                delay = state.runtime().policy.delay_ms(problem, retries)
                if delay is None:
                    raise
                retries += 1
                time.sleep(delay / 1000)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
