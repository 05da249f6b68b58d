"""`memsync`: run the local stack, the demo, and inspect or repair state. `--json` for scripts."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import redis

from actors import state
from actors.demo import run_demo
from actors.errors import MemsyncError
from actors.local import local_stack
from kvstore import KVStoreError
from settings import SettingsError
from vectorstore import VectorStoreError
from vectorstore.reconcile import reconcile

__all__ = ["main"]

Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command: Command = args.command
    try:
        return command(args)
    except (MemsyncError, KVStoreError, VectorStoreError, SettingsError) as error:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except redis.RedisError as error:  # only its type: redis-py's text may name the host
        print(f"error: Redis is unreachable ({type(error).__name__}); is REDIS_URL right?", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memsync", description=__doc__)
    parser.set_defaults(command=lambda _: _usage(parser))
    sub = parser.add_subparsers(title="commands")
    sub.add_parser("up", help="run Redis, Chroma and a worker locally until stopped").set_defaults(
        command=_up
    )
    sub.add_parser("demo", help="sync, search and roll back, end to end").set_defaults(command=_demo)
    search = _with_json(sub.add_parser("search", help="the memories closest in meaning to a query"))
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--namespace")
    search.set_defaults(command=_search)
    get = _with_json(sub.add_parser("get", help="a key's current value and its history"))
    get.add_argument("key")
    get.add_argument("--namespace")
    get.set_defaults(command=_get)
    recon = _with_json(sub.add_parser("reconcile", help="repair missing, stale and orphan vectors"))
    recon.add_argument("--namespace", action="append", help="only these namespaces (repeatable)")
    recon.add_argument("--dry-run", action="store_true", help="report, change nothing")
    recon.set_defaults(command=_reconcile)
    _dlq_commands(sub.add_parser("dlq", help="dead-lettered messages").add_subparsers(title="dlq commands"))
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _dlq_commands(sub: Any) -> None:
    _with_json(sub.add_parser("list", help="id, actor, key, reason, when")).set_defaults(command=_dlq_list)
    replay = _with_json(sub.add_parser("replay", help="put dead letters back on their queue"))
    replay.add_argument("ids", nargs="*")
    replay.add_argument("--all", action="store_true")
    replay.set_defaults(command=_dlq_replay)


def _with_json(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _up(args: argparse.Namespace) -> int:
    with local_stack(state.settings(), worker=True) as stack:
        print(f"REDIS_URL={stack.redis_url}\nCHROMA_URL={stack.chroma_url}")
        print(f"started: {', '.join(stack.started) or 'nothing (all running already)'}; Ctrl-C stops")
        sys.stdout.flush()
        _wait_for_signal()
    return 0


def _wait_for_signal() -> None:
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()


def _demo(args: argparse.Namespace) -> int:
    return run_demo(state.settings(), print)


def _search(args: argparse.Namespace) -> int:
    hits = state.runtime().memories.search(args.query, args.k, args.namespace)
    rows = [asdict(hit) for hit in hits]
    _emit(
        args,
        rows,
        lambda row: f"{row['score']:.3f}  {row['key']} (v{row['version']}): {json.dumps(row['value'])}",
    )
    return 0


def _get(args: argparse.Namespace) -> int:
    store = state.runtime().store
    records = [
        store.record(args.key, namespace=args.namespace),
        *store.history(args.key, namespace=args.namespace),
    ]
    rows = [_record_row(record) for record in records if record is not None]
    _emit(
        args, rows, lambda row: f"v{row['version']}  {'(deleted)' if row['deleted'] else row['value_json']}"
    )
    return 0 if rows else 1


def _record_row(record: Any) -> dict[str, Any]:
    return {**asdict(record), "deleted": record.deleted}


def _reconcile(args: argparse.Namespace) -> int:
    drifts = reconcile(state.runtime().memories, args.namespace, repair=not args.dry_run)
    rows = [{"namespace": d.namespace, **d.counts(), "repaired": not args.dry_run} for d in drifts]
    _emit(
        args,
        rows,
        lambda r: f"{r['namespace']}: missing {r['missing']}, stale {r['stale']}, orphan {r['orphan']}",
    )
    return 0


def _dlq_list(args: argparse.Namespace) -> int:
    letters = state.runtime().dead_letters.all()
    # vars(), not asdict(): that copies the message recursively, which fails on a deeply nested value.
    rows = [{k: v for k, v in vars(letter).items() if k != "message"} for letter in letters]
    _emit(
        args,
        rows,
        lambda r: f"{r['message_id']}  {r['actor']}  {r['key']!r}  {r['reason']}  at {r['failed_at_ms']}",
    )
    return 0


def _dlq_replay(args: argparse.Namespace) -> int:
    dead_letters = state.runtime().dead_letters
    ids = [letter.message_id for letter in dead_letters.all()] if args.all else list(args.ids)
    if not ids:
        print("error: name message ids, or --all", file=sys.stderr)
        return 2
    replayed = dead_letters.replay(state.broker(), ids)
    rows = [{"message_id": message_id, "replayed": message_id in replayed} for message_id in ids]
    _emit(args, rows, lambda r: f"{r['message_id']}: {'replayed' if r['replayed'] else 'not found'}")
    return 0 if len(replayed) == len(ids) else 1


def _emit(
    args: argparse.Namespace, rows: list[dict[str, Any]], line: Callable[[dict[str, Any]], str]
) -> None:
    if args.json:
        print(json.dumps(rows, default=str))
    else:
        for row in rows:
            print(line(row))
