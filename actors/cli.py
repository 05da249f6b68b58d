"""`memsync`: run the local stack, the demo, and inspect or repair state. `--json` for scripts."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

import redis
from dramatiq.errors import BrokerConnectionError

from actors import state
from actors.failures import explain
from kvstore import InvalidFilter, MemsyncError, check_namespace
from settings import SettingsError

# Each command imports what it runs (chromadb, openai, the worker's modules) when it runs, so that
# `memsync --help` and a bad setting answer at once: see bench/bench_cli.py.

__all__ = ["main"]

Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; exit 0, 1 when it failed, 2 for bad input or settings. Errors are one line."""
    parser = _parser()
    args = parser.parse_args(argv)
    command: Command = args.command
    try:
        return command(args)
    except BrokenPipeError:  # the reader went away (`memsync export | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as error:
        print(f"error: cannot open {error.filename}: {error.strerror}", file=sys.stderr)  # a path given
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the command stops where it was, as a shell's commands do
        print(file=sys.stderr)
        return 130
    except (MemsyncError, SettingsError, redis.RedisError, BrokerConnectionError) as error:
        line, status = explain(error)
        print(f"error: {line}", file=sys.stderr)
        return status


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
    search.add_argument("--where", help='a metadata filter as JSON, e.g. \'{"kind": "fact"}\'')
    search.add_argument("--min-score", type=float, help="leave out hits less similar than this (-1 to 1)")
    search.set_defaults(command=_search)
    listing = _with_json(sub.add_parser("list", help="the current memories of a namespace, in key order"))
    listing.add_argument("--namespace")
    listing.add_argument("--where", help="a metadata filter as JSON")
    listing.add_argument("--limit", type=int, default=100, help="memories per page (1 to 1000)")
    listing.add_argument("--cursor", help="where to go on from: the cursor the previous page printed")
    listing.set_defaults(command=_list)
    get = _with_json(sub.add_parser("get", help="a key's current value and its history"))
    get.add_argument("key")
    get.add_argument("--namespace")
    get.set_defaults(command=_get)
    recon = _with_json(sub.add_parser("reconcile", help="repair missing, stale and orphan vectors"))
    recon.add_argument("--namespace", action="append", help="only these namespaces (repeatable)")
    recon.add_argument("--dry-run", action="store_true", help="report, change nothing")
    recon.set_defaults(command=_reconcile)
    _dlq_commands(sub.add_parser("dlq", help="dead-lettered messages").add_subparsers(title="dlq commands"))
    _transfer_commands(sub)
    migrate = _with_json(
        sub.add_parser("migrate-index", help="carry vectors of an older layout into the shards")
    )
    migrate.set_defaults(command=_migrate_index)
    _reindex_command(sub)
    _status_command(sub)
    return parser


def _status_command(sub: Any) -> None:
    status = _with_json(sub.add_parser("status", help="queues, workers, memories, vectors; a health check"))
    status.add_argument("--namespace", action="append", help="only these namespaces (repeatable)")
    status.add_argument("--no-drift", action="store_true", help="skip the drift check (reads every vector)")
    status.set_defaults(command=_status)


def _reindex_command(sub: Any) -> None:
    reidx = _with_json(
        sub.add_parser("reindex", help="embed every memory with EMBEDDING_MODEL, then search with it")
    )
    reidx.add_argument("--batch-size", type=int, default=500, help="keys per embedding request (<= 2048)")
    reidx.add_argument("--drop-old", action="store_true", help="then delete the collections of other models")
    reidx.add_argument("--abort", action="store_true", help="give up a migration that has not switched yet")
    reidx.set_defaults(command=_reindex)


def _transfer_commands(sub: Any) -> None:
    imp = _with_json(sub.add_parser("import", help="sync memories from JSON Lines (FILE, or - for stdin)"))
    imp.add_argument("file")
    imp.add_argument("--batch-size", type=int, default=500, help="items per batch message (at most 1000)")
    imp.add_argument("--in-process", action="store_true", help="run the batches here, not on the workers")
    imp.set_defaults(command=_import)
    exp = sub.add_parser("export", help="write current memories as JSON Lines that import reads back")
    exp.add_argument("--namespace", action="append", help="only these namespaces (repeatable)")
    exp.add_argument("-o", "--output", help="a file to write (default: stdout)")
    exp.set_defaults(command=_export)


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
    from actors.local import local_stack, serve_until_signalled

    try:
        with local_stack(state.settings(), worker=True, say=_say) as stack:
            _say(f"REDIS_URL={stack.redis_url}\nCHROMA_URL={stack.chroma_url}")
            _say(f"started: {', '.join(stack.started) or 'nothing (all running already)'}; Ctrl-C stops")
            serve_until_signalled(stack)
    except KeyboardInterrupt:  # Ctrl-C while starting: what had started is stopped already
        _say("stopped")
        return 130
    _say("stopped")
    return 0


def _say(line: str) -> None:
    print(line, flush=True)


def _demo(args: argparse.Namespace) -> int:
    from actors.demo import run_demo

    return run_demo(state.settings(), print)


def _search(args: argparse.Namespace) -> int:
    from actors.views import hit_view, score_text

    memories = state.runtime().memories
    where = _where(args.where)
    hits = memories.search(args.query, args.k, args.namespace, where, min_score=args.min_score)
    rows = [hit_view(hit) for hit in hits]
    _emit(args, rows, lambda r: f"{score_text(r['score'])}  {r['key']} (v{r['version']}): {_value_text(r)}")
    if not rows:  # as grep: nothing found is exit status 1
        print(f"no memories match in namespace {check_namespace(args.namespace)}", file=sys.stderr)
    return 0 if rows else 1


def _list(args: argparse.Namespace) -> int:
    from actors.views import memory_view
    from kvstore.listing import list_memories

    store = state.runtime().store
    page = list_memories(store, args.namespace, _where(args.where), limit=args.limit, cursor=args.cursor)
    rows = [memory_view(record) for record in page.memories]
    if args.json:
        print(json.dumps({"memories": rows, "cursor": page.cursor}, default=str))
        return 0
    for row in rows:
        print(f"{row['key']} (v{row['version']}): {_value_text(row)}")
    if page.cursor is not None:
        print(f"more: --cursor {page.cursor}", file=sys.stderr)
    return 0


def _where(text: str | None) -> Any:
    """The filter `--where` gives, read as JSON (checked where it is used)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as err:
        raise InvalidFilter(f"--where is not JSON: {err}") from None


def _get(args: argparse.Namespace) -> int:
    from actors.views import memory_view

    store = state.runtime().store
    current = store.record(args.key, namespace=args.namespace)
    records = [] if current is None else [current, *store.history(args.key, namespace=args.namespace)]
    rows = [memory_view(record) for record in records]
    _emit(args, rows, lambda r: f"v{r['version']}  {_value_text(r)}")
    if not rows:
        namespace = check_namespace(args.namespace)
        print(f"no memory {json.dumps(args.key)} in namespace {namespace}", file=sys.stderr)
    return 0 if rows else 1


def _value_text(row: dict[str, Any]) -> str:
    return "(deleted)" if row["deleted"] else json.dumps(row["value"], ensure_ascii=False)


def _status(args: argparse.Namespace) -> int:
    from actors.status import read_status, status_lines

    found = read_status(state.runtime(), state.broker(), namespaces=args.namespace, drift=not args.no_drift)
    print(json.dumps(found.as_dict()) if args.json else "\n".join(status_lines(found)))
    return found.exit_code


def _reconcile(args: argparse.Namespace) -> int:
    from vectorstore.reconcile import reconcile

    drifts = reconcile(state.runtime().memories, args.namespace, repair=not args.dry_run)
    rows = [{"namespace": d.namespace, **d.counts(), "repaired": not args.dry_run} for d in drifts]
    _emit(
        args,
        rows,
        lambda r: f"{r['namespace']}: missing {r['missing']}, stale {r['stale']}, orphan {r['orphan']}",
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from actors.payloads import MAX_BATCH_ITEMS
    from actors.transfer import Bar, NoWorker, import_lines, read_lines, workers_alive

    if not 1 <= args.batch_size <= MAX_BATCH_ITEMS:
        print(f"error: --batch-size must be from 1 to {MAX_BATCH_ITEMS}", file=sys.stderr)
        return 2
    runtime = state.runtime()
    if not args.in_process and workers_alive(runtime) == 0:
        raise NoWorker(
            "no worker is running: start one (the Procfile's worker, or `memsync up`), or use --in-process"
        )
    with _opened(args.file) as source:
        total = None if args.file == "-" else _count_lines(source)
        bar = Bar(total) if sys.stderr.isatty() and not args.json else None
        summary = import_lines(
            read_lines(source), runtime, batch_size=args.batch_size, in_process=args.in_process, progress=bar
        )
    if bar is not None:
        bar.close()
    _print_summary(args, summary.as_dict())
    return 1 if summary.counts["failed"] else 0


def _print_summary(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(summary))
        return
    counts = ", ".join(
        f"{name} {summary[name]}" for name in ("applied", "unchanged", "duplicate", "stale", "failed")
    )
    print(counts)
    for failure in summary["failures"]:
        print(f"  {failure}")


def _export(args: argparse.Namespace) -> int:
    from actors.transfer import export_lines

    runtime = state.runtime()
    if args.output is None:
        written = export_lines(runtime, args.namespace, sys.stdout)
    else:
        with open(args.output, "w", encoding="utf-8") as out:
            written = export_lines(runtime, args.namespace, out)
    print(f"exported {written} memories", file=sys.stderr)
    return 0


def _migrate_index(args: argparse.Namespace) -> int:
    from vectorstore.migrate import migrate_legacy

    migrated = migrate_legacy(state.runtime().memories.index)
    rows = [{"collection": m.collection, "vectors": m.vectors} for m in migrated]
    _emit(args, rows, lambda r: f"{r['collection']}: {r['vectors']} vectors carried over")
    if not rows and not args.json:
        print("nothing to migrate: every collection of this model is in the current layout")
    return 0


def _reindex(args: argparse.Namespace) -> int:
    from actors.indexes import own_spec
    from actors.transfer import Bar
    from vectorstore.embedder import MAX_INPUTS_PER_REQUEST
    from vectorstore.reindex import ReindexSummary, reindex

    if args.abort:
        return _abort_reindex(args)
    if not 1 <= args.batch_size <= MAX_INPUTS_PER_REQUEST:
        print(f"error: --batch-size must be from 1 to {MAX_INPUTS_PER_REQUEST}", file=sys.stderr)
        return 2
    runtime = state.runtime()
    bar = Bar(None) if sys.stderr.isatty() and not args.json else None

    def show(summary: ReindexSummary) -> None:
        if bar is not None:
            bar.total = summary.total
            bar.show(summary.done, summary.resumed_at)

    target = own_spec(runtime.settings)
    summary = reindex(runtime.indexes, target, batch_size=args.batch_size, progress=show, drop=args.drop_old)
    if bar is not None and summary.batches:
        bar.close()
    _print_reindex(args, summary.as_dict())
    return 0


def _abort_reindex(args: argparse.Namespace) -> int:
    from vectorstore.reindex import abort

    migration = abort(state.runtime().indexes)
    if args.json:
        print(json.dumps({"aborted": None if migration is None else str(migration.target)}))
    else:
        print(f"gave up the migration to {migration.target}" if migration else "no migration is under way")
    return 0


def _print_reindex(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(summary))
        return
    if summary["switched"]:
        print(
            f"search now uses {summary['to']}: {summary['keys']} keys moved from {summary['from']}, "
            f"{summary['embedded']} texts embedded by this run"
        )
    else:
        print(f"nothing to move: {summary['to']} is the index in use")
    for name in summary["dropped"]:
        print(f"dropped {name}")


def _count_lines(source: TextIO) -> int:
    """How many non-blank lines a file has, for the progress bar's ETA; the file is rewound."""
    total = sum(1 for line in source if line.strip())
    source.seek(0)
    return total


@contextmanager
def _opened(name: str) -> Iterator[TextIO]:
    if name == "-":
        yield sys.stdin
        return
    with open(name, encoding="utf-8") as source:
        yield source


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
    refused: dict[str, str] = {}
    replayed = dead_letters.replay(state.broker(), ids, on_refused=refused.__setitem__)
    rows = [
        {"message_id": message_id, "replayed": message_id in replayed, "refused": refused.get(message_id)}
        for message_id in ids
    ]
    _emit(args, rows, _replay_line)
    return 0 if len(replayed) == len(ids) else 1


def _replay_line(row: dict[str, Any]) -> str:
    if row["replayed"]:
        return f"{row['message_id']}: replayed"
    if row["refused"]:
        return f"{row['message_id']}: kept, it would fail again: {row['refused']}"
    return f"{row['message_id']}: not found"


def _emit(
    args: argparse.Namespace, rows: list[dict[str, Any]], line: Callable[[dict[str, Any]], str]
) -> None:
    if args.json:
        print(json.dumps(rows, default=str))
    else:
        for row in rows:
            print(line(row))
