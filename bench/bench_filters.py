"""Filtered search at 100,000 memories: Chroma's filtered query against a post-filter in Python, and listing.

The memories are written to Redis with `MemoryStore.write_many` and indexed with seeded random unit
vectors (1,536 dimensions) twice, each time under a prefix of its own and on a `chroma run` of its own
(Chroma keeps every collection's metadata in one SQLite database, and a filter term's cost follows the
rows it matches there), both loads at once: all in ONE namespace, so that one shard holds them all
(the worst case), and spread over 100 namespaces of 1,000 (a seeded permutation decides which memory
goes where). Memory `n` carries the metadata {"kind": "k{n % 10}", "group": "g{n % 100}", "n": n}.

For each filter, `--queries` timed queries (after 20 warm-up ones), k = 10, each query a different text:
- search(): `Memories.search`, the real path: the query embedded through the openai SDK by the test
  embedding server, Chroma's filtered query in the namespace's shard, the Redis join;
- post-filter n = k*10 and n = k*30: the same embedding, Chroma queried for the n nearest of the
  namespace (no other filter), their Redis records read, then `kvstore.filters.matches` on the records'
  metadata and the first k kept. The fetch does not depend on the filter, so each query's fetch is
  made once and timed once, and each filter's latency is that fetch plus its own filtering, timed;
- in the one-namespace case, the same post-filter with Chroma queried without the namespace term, as
  a collection of the namespace's own would be (its shard holds nothing else, so the answers are the same);
- recall@10: the share of the exact answer found, the exact answer being cosine in numpy over the
  namespace's memories that the filter keeps (the query's vector is the test server's `vector_for`).
  For the post-filter, also the recall it would have with the exact n nearest (what the design can
  reach at best, whatever the vector index's own recall).
Beside them: the embedding request alone (part of every figure above); Chroma's query alone in the
one-namespace case, with and without each term of its filter; and listing without a query,
`kvstore.listing.list_memories(limit=100)`, page by page through the whole one-namespace case.

Run: python bench/bench_filters.py [--memories 100000] [--queries 200] [--write]
(starts its own Redis, Chroma and embedding servers under a temporary directory, removed at the end;
--write puts the tables into BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test servers live in tests/support

from kvstore import KeyRef, MemoryStore, Record, Write, WriteMeta, canonical_json, content_hash  # noqa: E402
from kvstore.filters import Where, check_where, matches, renamed  # noqa: E402
from kvstore.listing import list_memories  # noqa: E402
from kvstore.server import redis_server_binary  # noqa: E402
from kvstore.validate import metadata_json  # noqa: E402
from tests.support.embedding_server import EmbeddingServer, vector_for  # noqa: E402
from tests.support.services import Service, start_chroma, start_redis  # noqa: E402
from vectorstore.embedder import OpenAIEmbedder  # noqa: E402
from vectorstore.index import (  # noqa: E402
    DEFAULT_SHARDS,
    IndexEntry,
    VectorIndex,
    chroma_client,
    shard_name,
    user_field,
)
from vectorstore.sync import Memories  # noqa: E402

DIMS = 1536
K = 10
OVERFETCH = (10, 30)
WARMUP = 20
#: Vectors per upsert: 5,000 of 1,536 dimensions are more than `chroma run` takes in one request (413).
LOAD_BATCH = 2000
SPREAD_NAMESPACES = 100
LIST_LIMIT = 100
ALONE_QUERIES = 50
SEED = 20261202
API_KEY = "sk-bench"
GOAL_P95_MS = 50.0
MARKER_START, MARKER_END = "<!-- bench_filters:start -->", "<!-- bench_filters:end -->"
Matrix = npt.NDArray[np.float32]
Rows = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Case:
    """A filter measured, by the name the tables give it."""

    name: str
    where: Where | None


@dataclass(frozen=True)
class Layout:
    """Memories 0..size-1, each in the namespace `owner[row]` names, and their Memories."""

    name: str
    memories: Memories
    namespaces: list[str]
    owner: Rows

    def namespace_of(self, row: int) -> str:
        return self.namespaces[int(self.owner[row])]

    def rows_of(self, namespace: int) -> Rows:
        return np.flatnonzero(self.owner == namespace)


@dataclass(frozen=True)
class Query:
    """One query: its text, the vector the test server gives it, the namespace (index) it searches."""

    text: str
    vector: Matrix
    namespace: int


@dataclass(frozen=True)
class Exact:
    """The exact answers to one query, by filter: the top K of the memories the filter keeps, and
    what a post-filter of the exact K*over nearest would keep (by (filter, over))."""

    truth: dict[str, set[str]]
    ideal: dict[tuple[str, int], set[str]]


@dataclass(frozen=True)
class Series:
    """Latencies (ms) of one way of answering one filter's queries; mean recall@K, and the ideal one."""

    samples_ms: list[float]
    recall: float | None = None
    ideal: float | None = None

    @property
    def p95(self) -> float:
        return percentile(self.samples_ms, 95)

    def cell(self) -> str:
        return f"{percentile(self.samples_ms, 50):.1f} / {self.p95:.1f}"

    def recall_cell(self) -> str:
        shown = "" if self.recall is None else f"{self.recall:.2f}"
        return shown if self.ideal is None else f"{shown} ({self.ideal:.2f})"


@dataclass
class Tally:
    """Samples and recalls gathered query by query."""

    samples_ms: list[float] = field(default_factory=list)
    recalls: list[float] = field(default_factory=list)
    ideals: list[float] = field(default_factory=list)

    def add(self, ms: float, found: Sequence[str], truth: set[str], ideal: set[str] | None = None) -> None:
        self.samples_ms.append(ms)
        self.recalls.append(recall(found, truth))
        if ideal is not None:
            self.ideals.append(recall(ideal, truth))

    def series(self) -> Series:
        ideal = float(np.mean(self.ideals)) if self.ideals else None
        return Series(self.samples_ms, float(np.mean(self.recalls)), ideal)


@dataclass(frozen=True)
class Row:
    """One filter in one layout: the share of the memories it keeps, and each design's figures."""

    layout: str
    case: Case
    kept: float
    search: Series
    post: dict[str, Series]


@dataclass(frozen=True)
class Walk:
    """Listing one namespace through with one filter, a page of LIST_LIMIT at a time."""

    case: Case
    pages_ms: list[float]
    listed: int

    @property
    def pages(self) -> Series:
        return Series(self.pages_ms)

    @property
    def total_s(self) -> float:
        return sum(self.pages_ms) / 1000


def metadata_of(row: int) -> dict[str, str | int]:
    return {"kind": f"k{row % 10}", "group": f"g{row % 100}", "n": row}


def text_of(row: int) -> str:
    return f"memory {row}: the user likes topic {row % 37} and mentioned item {row * 7919 % 1000}"


def key_of(row: int) -> str:
    return f"m{row:07d}"


def keys_of(rows: Rows) -> set[str]:
    return {key_of(int(row)) for row in rows}


def recall(found: Sequence[str] | set[str], truth: set[str]) -> float:
    """The share of `truth` found; 1.0 when there was nothing to find."""
    return len(set(found) & truth) / len(truth) if truth else 1.0


def cases(size: int) -> list[Case]:
    """The filters measured; they keep 100%, 10%, 1%, 10%, 10% and 5% of the memories."""
    return [
        Case("none", None),
        Case('kind = "k3"', check_where({"kind": "k3"})),
        Case('group = "g42"', check_where({"group": "g42"})),
        Case(f"n >= {size * 9 // 10:,}", check_where({"n": {"$gte": size * 9 // 10}})),
        Case("group $in 10 values", check_where({"group": {"$in": [f"g{i}" for i in range(10)]}})),
        Case(f'kind = "k3" $and n < {size // 2:,}', check_where({"kind": "k3", "n": {"$lt": size // 2}})),
    ]


def masks_of(chosen: Sequence[Case], size: int) -> dict[str, Mask]:
    """Which memories each filter keeps, by `kvstore.filters.matches` on their metadata."""
    return {
        case.name: np.fromiter((matches(case.where, metadata_of(row)) for row in range(size)), bool, size)
        for case in chosen
    }


def unit_vectors(count: int) -> Matrix:
    vectors = np.random.default_rng(SEED).standard_normal((count, DIMS), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def queries(count: int, namespaces: int) -> list[Query]:
    """Query texts (warm-up ones first) with the vectors the test server answers for them."""
    made = []
    for i in range(count):
        text = f"query {i}: what does the user say about topic {i % 37} and item {i * 104729 % 1000}?"
        vector = np.asarray(vector_for(text, DIMS), dtype=np.float32)
        made.append(Query(text, vector, i % namespaces))
    return made


def exact(layout: Layout, vectors: Matrix, masks: dict[str, Mask], query: Query) -> Exact:
    rows = layout.rows_of(query.namespace)
    order = rows[np.argsort(-(vectors[rows] @ query.vector), kind="stable")]
    truth, ideal = {}, {}
    for name, mask in masks.items():
        truth[name] = keys_of(order[mask[order]][:K])
        for over in OVERFETCH:
            nearest = order[: K * over]
            ideal[(name, over)] = keys_of(nearest[mask[nearest]][:K])
    return Exact(truth, ideal)


# --- loading ------------------------------------------------------------------------------------


def load(layout: Layout, vectors: Matrix) -> float:
    """Write every memory of the layout to Redis and the index, LOAD_BATCH at a time; returns seconds."""
    started = time.perf_counter()
    for start in range(0, len(vectors), LOAD_BATCH):
        rows = range(start, min(start + LOAD_BATCH, len(vectors)))
        writes = [_write(KeyRef(layout.namespace_of(row), key_of(row)), row) for row in rows]
        results = layout.memories.store.write_many(writes)
        entries = [_entry(result, row) for result, row in zip(results, rows, strict=True)]
        layout.memories.index.upsert(entries, vectors[rows.start : rows.stop])
    return time.perf_counter() - started


def _write(ref: KeyRef, row: int) -> Write:
    text = text_of(row)
    return Write(
        ref, "set", WriteMeta(), canonical_json(text, 1_000_000), True, content_hash(text),
        metadata_json=metadata_json(metadata_of(row)),
    )  # fmt: skip


def _entry(result: Any, row: int) -> IndexEntry:
    current: Record | None = getattr(result, "current", None)
    if current is None:
        raise RuntimeError(f"memory {row} was not written: {result}")
    return IndexEntry(
        current.namespace, current.key, current.version, current.content_hash, metadata=metadata_of(row)
    )


# --- the two designs ----------------------------------------------------------------------------


def search_keys(memories: Memories, query: Query, namespace: str, where: Where | None) -> list[str]:
    """The real path: `Memories.search`."""
    return [hit.key for hit in memories.search(query.text, K, namespace, where)]


Fetched = list[tuple[IndexEntry, Record]]
#: The post-filter's first part: the `n` nearest of a namespace that are current, with their records.
Fetch = Callable[[Memories, Query, str, int], Fetched]


@dataclass(frozen=True)
class Design:
    """A post-filter: where its candidates come from, and how many (K * over) it asks for."""

    label: str
    fetch: Fetch
    over: int


def fetch(memories: Memories, query: Query, namespace: str, n: int) -> Fetched:
    """Candidates through `VectorIndex.query`: Chroma's query with the namespace term only."""
    vector = memories.embedder.embed([query.text])[0]
    return _joined(memories, memories.index.query(namespace, vector, n), namespace)


def unscoped(collection: Any) -> Fetch:
    """Candidates from Chroma's query without any filter, in a collection that holds one namespace."""

    def run(memories: Memories, query: Query, namespace: str, n: int) -> Fetched:
        vector = memories.embedder.embed([query.text])[0]
        answer = collection.query(query_embeddings=vector[None, :], n_results=n, include=["metadatas"])
        entries = [
            IndexEntry(str(m["namespace"]), str(m["key"]), int(m["version"]), str(m["hash"]))
            for m in answer["metadatas"][0]
        ]
        return _joined(memories, entries, namespace)

    return run


def _joined(memories: Memories, entries: list[IndexEntry], namespace: str) -> Fetched:
    records = memories.store.records([entry.key for entry in entries], namespace=namespace)
    return [
        (e, records[e.key]) for e in entries if e.namespace == namespace and _current(e, records.get(e.key))
    ]


def post_filter(fetched: Fetched, where: Where | None) -> list[str]:
    """The post-filter's second part: the first K fetched memories whose metadata the filter keeps."""
    checked = check_where(where)
    return [entry.key for entry, record in fetched if matches(checked, record.metadata)][:K]


def _current(entry: IndexEntry, record: Record | None) -> bool:
    if record is None or record.deleted or not record.embed:
        return False
    return entry.version == record.version and entry.content_hash == record.content_hash


# --- measuring ----------------------------------------------------------------------------------


def measure_search(layout: Layout, case: Case, runs: Sequence[Query], exacts: Sequence[Exact]) -> Series:
    """`Memories.search` over the timed queries (after WARMUP untimed ones)."""
    memories, tally = layout.memories, Tally()
    for query in runs[:WARMUP]:
        search_keys(memories, query, layout.namespaces[query.namespace], case.where)
    for query, answers in zip(runs[WARMUP:], exacts, strict=True):
        started = time.perf_counter()
        found = search_keys(memories, query, layout.namespaces[query.namespace], case.where)
        tally.add((time.perf_counter() - started) * 1000, found, answers.truth[case.name])
    return tally.series()


def measure_post(
    layout: Layout, design: Design, chosen: Sequence[Case], runs: Sequence[Query], exacts: Sequence[Exact]
) -> dict[str, Series]:
    """A post-filter, every filter: one timed fetch per query, then each filter's own step timed."""
    memories, tallies, n = layout.memories, {case.name: Tally() for case in chosen}, K * design.over
    for query in runs[:WARMUP]:
        design.fetch(memories, query, layout.namespaces[query.namespace], n)
    for query, answers in zip(runs[WARMUP:], exacts, strict=True):
        started = time.perf_counter()
        fetched = design.fetch(memories, query, layout.namespaces[query.namespace], n)
        fetch_s = time.perf_counter() - started
        for case in chosen:
            started = time.perf_counter()
            found = post_filter(fetched, case.where)
            ms = (fetch_s + time.perf_counter() - started) * 1000
            tallies[case.name].add(
                ms, found, answers.truth[case.name], answers.ideal[(case.name, design.over)]
            )
    return {name: tally.series() for name, tally in tallies.items()}


def embedding_alone(memories: Memories, runs: Sequence[Query]) -> Series:
    """The query embedding request by itself: the SDK, HTTP and the test server's answer."""
    for query in runs[:WARMUP]:
        memories.embedder.embed([query.text])
    samples = []
    for query in runs[WARMUP:]:
        started = time.perf_counter()
        memories.embedder.embed([query.text])
        samples.append((time.perf_counter() - started) * 1000)
    return Series(samples)


def chroma_alone(layout: Layout, case: Case, runs: Sequence[Query]) -> list[tuple[str, Series]]:
    """Chroma's query by itself (n = K + 10, as search() asks first) in the layout's first namespace,
    with each part of the filter search() sends, and without any."""
    collection, namespace = shard_of(layout, 0), layout.namespaces[0]
    own: dict[str, Any] = {"namespace": namespace}
    mine = renamed(case.where or {}, user_field)
    wheres = [("no filter", None), ("namespace only", own), (f"{case.name} only", mine)]
    wheres.append((f"namespace $and {case.name} (what search() sends)", {"$and": [own, mine]}))
    return [(label, _time_chroma(collection, where, runs)) for label, where in wheres]


def shard_of(layout: Layout, namespace: int) -> Any:
    """The Chroma collection (the shard) that holds a namespace of the layout."""
    index, name = layout.memories.index, layout.namespaces[namespace]
    shard = shard_name(index.prefix, index.model, index.dimensions, index.shard_of(name), index.shards)
    return index.client.get_collection(shard, embedding_function=None)


def _time_chroma(collection: Any, where: dict[str, Any] | None, runs: Sequence[Query]) -> Series:
    samples = []
    for n, query in enumerate(runs[: 10 + ALONE_QUERIES]):
        started = time.perf_counter()
        collection.query(query_embeddings=query.vector[None, :], n_results=K + 10, where=where)
        if n >= 10:
            samples.append((time.perf_counter() - started) * 1000)
    return Series(samples)


def walk(store: MemoryStore, namespace: str, case: Case) -> Walk:
    """List a namespace through with a filter, following the cursor to the end."""
    pages, listed, cursor = [], 0, None
    while True:
        started = time.perf_counter()
        page = list_memories(store, namespace, case.where, limit=LIST_LIMIT, cursor=cursor)
        pages.append((time.perf_counter() - started) * 1000)
        listed += len(page.memories)
        if page.cursor is None:
            return Walk(case, pages, listed)
        cursor = page.cursor


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# --- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Results:
    """Everything one run measured."""

    size: int
    queries: int
    load: str
    load_s: float
    embedding: Series
    rows: list[Row]
    alone: list[tuple[str, Series]]
    walks: list[Walk]


class Bench:
    """One run: its servers, its two layouts and its vectors."""

    def __init__(
        self, redis_url: str, chroma_urls: Sequence[str], server: EmbeddingServer, size: int
    ) -> None:
        self.size = size
        self.vectors = unit_vectors(size)
        self.cases = cases(size)
        self.masks = masks_of(self.cases, size)
        client, run = redis.Redis.from_url(redis_url), uuid.uuid4().hex[:6]

        def memories(name: str, chroma_url: str) -> Memories:
            prefix = f"bf{run}{name}"
            store = MemoryStore(client, prefix=prefix)
            chroma = chroma_client(chroma_url)
            index = VectorIndex(chroma, model="bench", dimensions=DIMS, prefix=prefix, shards=DEFAULT_SHARDS)
            embedder = OpenAIEmbedder(
                api_key=API_KEY, model="bench", dimensions=DIMS, base_url=server.base_url
            )
            return Memories(store, index, embedder)

        self.one = Layout("one namespace", memories("one", chroma_urls[0]), ["all"], np.zeros(size, np.int64))
        owner = np.random.default_rng(SEED + 1).permutation(size) % SPREAD_NAMESPACES
        names = [f"ns-{n:03d}" for n in range(SPREAD_NAMESPACES)]
        self.spread = Layout(
            f"{SPREAD_NAMESPACES} namespaces", memories("spread", chroma_urls[1]), names, owner
        )

    def run(self, count: int) -> Results:
        load = " ".join(f"{value:.2f}" for value in os.getloadavg())
        load_s = self._load()
        progress(f"{len(self.cases)} filters, {count} timed queries each")
        runs = queries(WARMUP + count, 1)
        embedding = embedding_alone(self.one.memories, runs)
        own = [Design(f"own collection, post-filter n={K * over}", unscoped(shard_of(self.one, 0)), over)
               for over in OVERFETCH]  # fmt: skip
        rows = self._layout(self.one, runs, own)
        rows += self._layout(self.spread, queries(WARMUP + count, SPREAD_NAMESPACES), [])
        alone = chroma_alone(self.one, self.cases[1], runs)
        walks = [self._walk(case) for case in self.cases[:3]]
        return Results(self.size, count, load, load_s, embedding, rows, alone, walks)

    def _load(self) -> float:
        progress(f"loading {self.size:,} memories twice, the two layouts at once")
        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(self._load_one, (self.one, self.spread)))
        return time.perf_counter() - started

    def _load_one(self, layout: Layout) -> None:
        progress(f"  {layout.name}: loaded in {load(layout, self.vectors):.0f} s")

    def _layout(self, layout: Layout, runs: Sequence[Query], more: list[Design]) -> list[Row]:
        started = time.perf_counter()
        exacts = [exact(layout, self.vectors, self.masks, query) for query in runs[WARMUP:]]
        progress(f"  {layout.name}: exact answers {time.perf_counter() - started:.0f} s")
        designs = [Design(f"post-filter n={K * over}", fetch, over) for over in OVERFETCH] + more
        post = {
            d.label: self._timed(d.label, measure_post, layout, d, self.cases, runs, exacts) for d in designs
        }
        return [self._row(layout, case, runs, exacts, post) for case in self.cases]

    def _row(
        self,
        layout: Layout,
        case: Case,
        runs: Sequence[Query],
        exacts: Sequence[Exact],
        post: dict[str, dict[str, Series]],
    ) -> Row:
        search = self._timed(f"search(), {case.name}", measure_search, layout, case, runs, exacts)
        kept = float(self.masks[case.name].mean())
        return Row(layout.name, case, kept, search, {label: by[case.name] for label, by in post.items()})

    def _timed(self, what: str, step: Callable[..., Any], layout: Layout, *args: Any) -> Any:
        started = time.perf_counter()
        answer = step(layout, *args)
        progress(f"  {layout.name}, {what}: {time.perf_counter() - started:.0f} s")
        return answer

    def _walk(self, case: Case) -> Walk:
        found = walk(self.one.memories.store, self.one.namespaces[0], case)
        progress(f"  listing, {case.name}: {found.total_s:.1f} s")
        return found


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextmanager
def servers() -> Iterator[tuple[str, list[str], EmbeddingServer]]:
    """A fresh redis-server and two `chroma run` in a temporary directory, and the test embedding server."""
    base = Path(tempfile.mkdtemp(prefix="memsync-filters-"))
    started: list[Service] = []
    server = EmbeddingServer(api_key=API_KEY, dimensions=DIMS).start()
    try:
        started.append(start_redis(base / "redis"))
        started += [start_chroma(base / name) for name in ("chroma-one", "chroma-spread")]
        yield started[0].url, [service.url for service in started[1:]], server
    finally:
        server.stop()
        for service in reversed(started):
            service.stop()
        shutil.rmtree(base, ignore_errors=True)


# --- report -------------------------------------------------------------------------------------


def report(results: Results) -> list[str]:
    lines = [
        f"Command: `python bench/bench_filters.py --memories {results.size} --queries {results.queries}`.",
        machine(results.load),
        f"Load: both layouts ({results.size:,} memories each: `write_many` and upserts of {LOAD_BATCH:,}), "
        f"each on its own `chroma run`, at once in {results.load_s:.0f} s.",
        "",
        f"k = {K}; {results.queries} timed queries per figure after {WARMUP} warm-up ones. Every figure "
        "includes the query's embedding request through the openai SDK to the test server, which alone "
        f"took {results.embedding.cell()} ms (p50 / p95).",
        "",
        *design_table(results.rows, "p50 / p95 ms", lambda series: series.cell()),
        "",
        "recall@10 against the exact answer; in brackets, what the post-filter would find with the exact "
        "n nearest:",
        "",
        *design_table(results.rows, "recall@10", lambda series: series.recall_cell()),
        "",
        *alone_table(results.alone),
        "",
        *listing_table(results.walks),
        "",
    ]
    return lines + verdict(results.rows)


def design_table(rows: list[Row], what: str, cell: Callable[[Series], str]) -> list[str]:
    labels = list(dict.fromkeys(label for row in rows for label in row.post))
    head = f"| {what}: layout | filter | kept | search() | " + " | ".join(labels) + " |"
    lines = [head, "|---|---|---:|---:|" + "---:|" * len(labels)]
    for row in rows:
        posts = " | ".join(cell(row.post[label]) if label in row.post else "" for label in labels)
        lines.append(f"| {row.layout} | {row.case.name} | {row.kept:.0%} | {cell(row.search)} | {posts} |")
    return lines


def alone_table(alone: list[tuple[str, Series]]) -> list[str]:
    head = f"| Chroma's query alone, one namespace, n = {K + 10}, {ALONE_QUERIES} queries: where "
    head += "| p50 / p95 ms |"
    return [head, "|---|---:|", *(f"| {label} | {series.cell()} |" for label, series in alone)]


def listing_table(walks: list[Walk]) -> list[str]:
    head = (
        f"| listing, limit {LIST_LIMIT}, one namespace, filter | pages | memories listed "
        "| page p50 / p95 ms | whole namespace s |"
    )
    rows = [
        f"| {w.case.name} | {len(w.pages_ms)} | {w.listed:,} | {w.pages.cell()} | {w.total_s:.2f} |"
        for w in walks
    ]
    return [head, "|---|---:|---:|---:|---:|", *rows]


def verdict(rows: list[Row]) -> list[str]:
    """The goal, p95 under GOAL_P95_MS ms for a filter keeping 10% of a namespace, design by design."""
    lines = []
    for row in rows:
        if row.case.where == {"kind": {"$eq": "k3"}}:
            designs = [("search()", row.search), *row.post.items()]
            told = "; ".join(_against_goal(name, series) for name, series in designs)
            lines.append(f"Goal (p95 under {GOAL_P95_MS:.0f} ms, 10% filter), {row.layout}: {told}.")
    return lines


def _against_goal(name: str, series: Series) -> str:
    verdict = "met" if series.p95 < GOAL_P95_MS else "missed"
    return f"{name} p95 {series.p95:.1f} ms ({verdict}, recall@10 {series.recall_cell()})"


def machine(load: str) -> str:
    redis_version = subprocess.run(
        [redis_server_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    server = next((part[2:] for part in redis_version if part.startswith("v=")), "?")
    return (
        f"Machine: {os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}, "
        f"chromadb {version('chromadb')}, redis-server {server}; the index in {DEFAULT_SHARDS} shards, "
        f"{DIMS} dimensions, cosine; load average before the run {load}."
    )


def write(lines: list[str]) -> None:
    """Put the lines between this bench's markers in BENCHMARKS.md, adding its section the first time."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8")
    body = "\n".join([MARKER_START, *lines, MARKER_END])
    if MARKER_START not in text:
        path.write_text(text.rstrip("\n") + "\n\n" + SECTION + body + "\n", encoding="utf-8")
        return
    head, _, rest = text.partition(MARKER_START)
    _, _, tail = rest.partition(MARKER_END)
    path.write_text(head + body + tail, encoding="utf-8")


SECTION = """## Filtered search at 100,000 memories

`bench/bench_filters.py` loads 100,000 memories (Redis records with metadata, seeded random unit
vectors of 1,536 dimensions) twice, each on a `chroma run` of its own: all in one namespace, so that
one shard collection holds them all (the worst case), and over 100 namespaces of 1,000. For each filter
it times `Memories.search` (the query embedded through the openai SDK by the test embedding server,
Chroma's filtered query, the Redis join) against the alternative: Chroma queried for the namespace only,
for the n nearest, then the records' metadata filtered in Python with `kvstore.filters.matches`; and, in
the one-namespace case, the same post-filter with no filter sent to Chroma at all, as a collection of
the namespace's own would be queried. Memory `n` has `kind` `k{n % 10}`, `group` `g{n % 100}` and `n`.
recall@10 is the share of the exact answer (cosine over the filtered memories, in numpy) that each
found. Random unit vectors in 1,536 dimensions are all nearly equally far from a query, which is the
hardest case there is for an HNSW index: the recall of any query that goes through Chroma's graph here
(search() unfiltered, every post-filter) is far below what it is on real embeddings. The figures in
brackets, the post-filter over the exact n nearest, are what that design can reach whatever the index.
Command (from the repository root, in the venv of the Quick start's test command):

```
python bench/bench_filters.py --write
```

"""


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--memories", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200, help="timed queries per figure")
    parser.add_argument("--write", action="store_true", help="put the tables into BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _arguments(argv)
    if args.memories % SPREAD_NAMESPACES:
        raise SystemExit(f"--memories must be a multiple of {SPREAD_NAMESPACES}")
    started = time.perf_counter()
    with servers() as (redis_url, chroma_urls, server):
        results = Bench(redis_url, chroma_urls, server, args.memories).run(args.queries)
    lines = report(results)
    print("\n".join(lines))
    progress(f"total {time.perf_counter() - started:.0f} s")
    if args.write:
        write(lines)


if __name__ == "__main__":
    main()
