"""Chroma index layouts for many namespaces: ingest rate, server memory, disk, start-up, scoped queries.

Layouts, each through its own `chroma run` server on a fresh data directory:
- "sharded S": S collections, a namespace hashed (sha256 mod S) to one of them, stored as a metadata
  field and filtered with `where={"namespace": ns}` in every query;
- "collection each": one collection per namespace, queried without a filter (only up to
  `--each-max` namespaces: it costs megabytes of server memory per namespace).

Every namespace holds 10 random unit vectors of 384 dimensions (fixed seed), with the metadata
memsync writes (key, namespace, version, hash). Memory is the VmRSS of the server and its children.
A second table splits out the first query to reach each collection (the server loads a collection
lazily, so those cost more) and the unfiltered query time, to show what the filter itself costs.

Run: python bench/bench_layout.py [--shards 1,16,64] [--namespaces 10,1000,10000]
(writes nothing outside temporary directories, which it removes)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection
from chromadb.api.types import QueryResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test servers live in tests/support

from tests.support.services import start_chroma
from vectorstore.index import shard_for  # the mapping memsync uses

VECTORS_PER_NAMESPACE = 10
DIMENSIONS = 384
BATCH = 500
WARMUP = 20
QUERIES = 300
RSS_AFTER_QUERIES = 200
UNFILTERED_QUERIES = 100
N_RESULTS = 5
SEED = 20261201
MIB = 1024 * 1024
Vectors = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True)
class Layout:
    """Where a namespace's vectors live: one of `shards` collections, or a collection of its own."""

    shards: int | None

    @property
    def name(self) -> str:
        return "collection each" if self.shards is None else f"sharded {self.shards}"

    @property
    def filtered(self) -> bool:
        return self.shards is not None

    def collection(self, namespace: str) -> str:
        if self.shards is None:
            return f"each-{namespace}"
        return f"shard-{self.shards}-{shard_for(namespace, self.shards)}"


@dataclass(frozen=True)
class Batch:
    """One upsert: up to BATCH vectors of one collection."""

    collection: str
    rows: np.ndarray[Any, np.dtype[np.int64]]
    ids: list[str]
    metadatas: list[dict[str, str | int]]


@dataclass(frozen=True)
class Result:
    """The figures of one layout at one namespace count."""

    layout: str
    namespaces: int
    vectors: int
    ingest_per_s: float
    rss_ingest_mb: float
    rss_queries_mb: float
    disk_mb: float
    startup_s: float
    all_answered_s: float
    p50_ms: float
    p95_ms: float
    unfiltered_p50_ms: float | None
    largest_collection: int
    short_answers: int
    first_touch: int
    first_touch_median_ms: float | None
    warm_p95_ms: float


def namespace_names(count: int) -> list[str]:
    return [f"ns-{n:05d}" for n in range(count)]


def unit_vectors(rng: np.random.Generator, count: int) -> Vectors:
    vectors = rng.standard_normal((count, DIMENSIONS), dtype=np.float32)
    norms: Vectors = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / norms


# --- ingest -------------------------------------------------------------------------------------


def plan_batches(layout: Layout, names: Sequence[str]) -> list[Batch]:
    """The upserts that load every namespace, grouped by collection, BATCH vectors at most."""
    members: dict[str, list[int]] = defaultdict(list)
    for index, namespace in enumerate(names):
        members[layout.collection(namespace)].append(index)
    batches = []
    for collection, indices in members.items():
        rows = (np.array(indices)[:, None] * VECTORS_PER_NAMESPACE + np.arange(VECTORS_PER_NAMESPACE)).ravel()
        for start in range(0, len(rows), BATCH):
            batches.append(_batch(collection, rows[start : start + BATCH], names))
    return batches


def _batch(collection: str, rows: np.ndarray[Any, np.dtype[np.int64]], names: Sequence[str]) -> Batch:
    ids, metadatas = [], []
    for row in rows.tolist():
        namespace, key = names[row // VECTORS_PER_NAMESPACE], f"k{row % VECTORS_PER_NAMESPACE}"
        ids.append(f"{namespace}:{key}#0")
        content_hash = hashlib.sha256(ids[-1].encode()).hexdigest()
        metadatas.append({"key": key, "namespace": namespace, "version": 1, "hash": content_hash})
    return Batch(collection, rows, ids, metadatas)


def ingest(
    client: ClientAPI, batches: Sequence[Batch], vectors: Vectors
) -> tuple[dict[str, Collection], float]:
    """Creates the collections and upserts every batch; returns them and the vectors per second."""
    collections: dict[str, Collection] = {}
    started = time.perf_counter()
    for batch in batches:
        if batch.collection not in collections:
            collections[batch.collection] = client.create_collection(
                batch.collection, configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
            )
        collections[batch.collection].upsert(
            ids=batch.ids, embeddings=vectors[batch.rows].tolist(), metadatas=list(batch.metadatas)
        )
    elapsed = time.perf_counter() - started
    return collections, len(vectors) / elapsed


# --- queries ------------------------------------------------------------------------------------


def scoped_query(collection: Collection, layout: Layout, namespace: str, vector: Vectors) -> QueryResult:
    where: dict[str, Any] | None = {"namespace": namespace} if layout.filtered else None
    return collection.query(
        query_embeddings=[vector.tolist()],
        n_results=N_RESULTS,
        where=where,
        include=["metadatas", "distances"],
    )


def checked_count(result: QueryResult, namespace: str) -> int:
    """How many hits a query returned, after asserting that all are the namespace's own."""
    ids = result["ids"][0]
    metadatas = (result["metadatas"] or [[]])[0]
    assert all(hit_id.startswith(f"{namespace}:") for hit_id in ids), (namespace, ids)
    assert all(metadata["namespace"] == namespace for metadata in metadatas), (namespace, metadatas)
    return len(ids)


@dataclass
class QueryRun:
    """The timed queries' latencies (seconds), and server RSS after RSS_AFTER_QUERIES queries.

    `first_touch` holds the timed queries that were the first of the run to reach their collection
    (the server loads a collection's index on its first query), `warm` all the others.
    """

    warm: list[float] = field(default_factory=list)
    first_touch: list[float] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    short_answers: int = 0
    rss_mb: float = 0.0

    @property
    def latencies(self) -> list[float]:
        return self.warm + self.first_touch

    def record(self, collection: str, elapsed: float, timed: bool) -> None:
        if timed:
            (self.warm if collection in self.touched else self.first_touch).append(elapsed)
        self.touched.add(collection)


def run_queries(
    collections: dict[str, Collection], layout: Layout, names: Sequence[str], count: int, pid: int
) -> QueryRun:
    rng = np.random.default_rng(SEED + 1)
    picks, vectors = rng.integers(len(names), size=WARMUP + count), unit_vectors(rng, WARMUP + count)
    run = QueryRun()
    for n, (pick, vector) in enumerate(zip(picks.tolist(), vectors, strict=True)):
        namespace = names[pick]
        collection = layout.collection(namespace)
        started = time.perf_counter()
        result = scoped_query(collections[collection], layout, namespace, vector)
        run.record(collection, time.perf_counter() - started, timed=n >= WARMUP)
        run.short_answers += checked_count(result, namespace) < N_RESULTS
        if n + 1 == min(RSS_AFTER_QUERIES, WARMUP + count):
            run.rss_mb = server_rss_mb(pid)
    return run


def unfiltered_p50_ms(collections: dict[str, Collection]) -> float:
    """The p50 of plain queries (no filter) in the largest collection: the cost without the filter path."""
    largest = max(collections.values(), key=lambda collection: collection.count())
    vectors = unit_vectors(np.random.default_rng(SEED + 2), UNFILTERED_QUERIES)
    samples = []
    for vector in vectors:
        started = time.perf_counter()
        largest.query(query_embeddings=[vector.tolist()], n_results=N_RESULTS, include=["distances"])
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def percentile_ms(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] * 1000


# --- the server's footprint ---------------------------------------------------------------------


def server_rss_mb(pid: int) -> float:
    """VmRSS of the process `pid` and all its descendants, in MiB."""
    return sum(_rss_kib(each) for each in _process_tree(pid)) / 1024


def _process_tree(pid: int) -> list[int]:
    parents: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent_of(entry)
            if parent is not None:
                parents[parent].append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        tree.append(pending.pop())
        pending.extend(parents[tree[-1]])
    return tree


def _parent_of(entry: Path) -> int | None:
    try:
        stat = (entry / "stat").read_text()
    except OSError:  # the process ended meanwhile
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and ')'


def _rss_kib(pid: int) -> int:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith("VmRSS:")), 0)


def disk_mb(directory: Path) -> float:
    """Space the files under `directory` take on disk (allocated blocks, as du), in MiB."""
    return sum(path.stat().st_blocks * 512 for path in directory.rglob("*") if path.is_file()) / MIB


# --- one configuration --------------------------------------------------------------------------


def client_of(url: str) -> ClientAPI:
    host, port = url.removeprefix("http://").split(":")
    return chromadb.HttpClient(host=host, port=int(port))


def measure(layout: Layout, namespaces: int, queries: int) -> Result:
    """Every figure of one layout at one namespace count, on a fresh data directory, removed after."""
    base = Path(tempfile.mkdtemp(prefix="memsync-layout-"))
    try:
        return _measure_in(base / "chroma", layout, namespace_names(namespaces), queries)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _measure_in(data: Path, layout: Layout, names: list[str], queries: int) -> Result:
    vectors = unit_vectors(np.random.default_rng(SEED), len(names) * VECTORS_PER_NAMESPACE)
    batches = plan_batches(layout, names)
    server = start_chroma(data)
    try:
        collections, rate = ingest(client_of(server.url), batches, vectors)
        rss_ingest = server_rss_mb(server.process.pid)
        run = run_queries(collections, layout, names, queries, server.process.pid)
        unfiltered = unfiltered_p50_ms(collections) if layout.filtered else None
        largest = max(collection.count() for collection in collections.values())
    finally:
        server.stop()
    disk = disk_mb(data)
    startup = restart_s(data, layout, names)
    return Result(
        layout=layout.name,
        namespaces=len(names),
        vectors=len(vectors),
        ingest_per_s=rate,
        rss_ingest_mb=rss_ingest,
        rss_queries_mb=run.rss_mb,
        disk_mb=disk,
        startup_s=startup[0],
        all_answered_s=startup[1],
        p50_ms=percentile_ms(run.latencies, 0.5),
        p95_ms=percentile_ms(run.latencies, 0.95),
        unfiltered_p50_ms=unfiltered,
        largest_collection=largest,
        short_answers=run.short_answers,
        first_touch=len(run.first_touch),
        first_touch_median_ms=statistics.median(run.first_touch) * 1000 if run.first_touch else None,
        warm_p95_ms=percentile_ms(run.warm, 0.95),
    )


def restart_s(data: Path, layout: Layout, names: Sequence[str]) -> tuple[float, float]:
    """Seconds from starting a server on `data` to the first scoped query's answer, and to every
    collection having answered one (the server loads a collection on its first query)."""
    vector = unit_vectors(np.random.default_rng(SEED + 3), 1)[0]
    started = time.perf_counter()
    server = start_chroma(data)
    try:
        client = client_of(server.url)
        first = query_each_collection(client, layout, names[:1], vector)
        first_s = time.perf_counter() - started
        query_each_collection(client, layout, names[1:], vector, skip=first)
        return first_s, time.perf_counter() - started
    finally:
        server.stop()


def query_each_collection(
    client: ClientAPI, layout: Layout, names: Sequence[str], vector: Vectors, skip: set[str] | None = None
) -> set[str]:
    """Queries one namespace of every collection not in `skip`; returns the collections queried."""
    done = set(skip or ())
    for namespace in names:
        name = layout.collection(namespace)
        if name not in done:
            collection = client.get_collection(name, embedding_function=None)
            checked_count(scoped_query(collection, layout, namespace, vector), namespace)
            done.add(name)
    return done


# --- report -------------------------------------------------------------------------------------

HEADER = (
    "| layout | namespaces | vectors | ingest vectors/s | server RSS MB (ingest / 200 queries) "
    "| disk MB | start-up s | query p50/p95 ms |\n|---|---:|---:|---:|---:|---:|---:|---:|"
)
DIAGNOSTICS_HEADER = (
    "| layout | namespaces | vectors in largest collection | unfiltered p50 ms (largest) "
    "| filtered p50 ms | first-touch queries (median ms) | p95 ms without them "
    "| restart: every collection answered s | answers short of 5 |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def row(result: Result) -> str:
    return (
        f"| {result.layout} | {result.namespaces:,} | {result.vectors:,} | {result.ingest_per_s:,.0f} "
        f"| {result.rss_ingest_mb:,.0f} / {result.rss_queries_mb:,.0f} | {result.disk_mb:,.1f} "
        f"| {result.startup_s:.2f} | {result.p50_ms:.1f} / {result.p95_ms:.1f} |"
    )


def diagnostics_row(result: Result) -> str:
    unfiltered = "-" if result.unfiltered_p50_ms is None else f"{result.unfiltered_p50_ms:.1f}"
    first_median = result.first_touch_median_ms
    first_touch = f"{result.first_touch}" + ("" if first_median is None else f" ({first_median:.1f})")
    return (
        f"| {result.layout} | {result.namespaces:,} | {result.largest_collection:,} | {unfiltered} "
        f"| {result.p50_ms:.1f} | {first_touch} | {result.warm_p95_ms:.1f} | {result.all_answered_s:.1f} "
        f"| {result.short_answers} |"
    )


def print_machine() -> None:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    cores, python = os.cpu_count(), platform.python_version()
    print(f"machine: {platform.machine()}, {cores} cores, Python {python}, chromadb {version('chromadb')}")
    print(f"load average before the run (1, 5, 15 min): {load}")
    print(
        f"{VECTORS_PER_NAMESPACE} vectors per namespace, {DIMENSIONS} dims, cosine, upserts of {BATCH}; "
        f"queries: {WARMUP} warm-up then timed ones, n_results={N_RESULTS}, a random namespace each\n",
        flush=True,
    )


# --- entry point --------------------------------------------------------------------------------


def counts(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--shards", type=counts, default=[1, 16, 64], help="shard counts, e.g. 1,16,64")
    parser.add_argument("--namespaces", type=counts, default=[10, 1000, 10000], help="e.g. 10,1000,10000")
    parser.add_argument("--each-max", type=int, default=1000, help="most namespaces for 'collection each'")
    parser.add_argument("--queries", type=int, default=QUERIES, help="timed queries per configuration")
    return parser.parse_args(argv)


def configurations(args: argparse.Namespace) -> list[tuple[Layout, int]]:
    chosen = []
    for namespaces in args.namespaces:
        chosen += [(Layout(shards), namespaces) for shards in args.shards]
        if namespaces <= args.each_max:
            chosen.append((Layout(None), namespaces))
    return chosen


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print_machine()
    print(HEADER, flush=True)
    results, started = [], time.monotonic()
    for layout, namespaces in configurations(args):
        results.append(measure(layout, namespaces, args.queries))
        print(row(results[-1]), flush=True)
    print(f"\nMB = MiB; {args.queries} timed queries each; total {time.monotonic() - started:.0f} s\n")
    print(DIAGNOSTICS_HEADER)
    for result in results:
        print(diagnostics_row(result))


if __name__ == "__main__":
    main()
