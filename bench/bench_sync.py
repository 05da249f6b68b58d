"""The data path, measured in one run on one Redis, one Chroma server and one worker configuration.

- (a) the ceiling: a no-op actor with the same middleware, storing its result, messages/s;
- (b) `memory_sync` without embedding, and (b)/(a);
- (c) syncs with embeddings against the test server at 50 ms per request: single sends with
  coalescing off and on, the batch actor, `memsync import`; memories/s, embedding requests per
  1,000 memories, and worker and Chroma CPU milliseconds per memory;
- (d) the ceiling of the embed path: Chroma's own batched upsert of the same vectors, same server;
- (e) `search()` p50/p95 at 10,000 and 100,000 memories (namespace-scoped), the bare Chroma query
  beside it, and the workers' peak memory;
- (f) peers fed the same memories through the same embedding server (`bench/peers.py`; needs the
  `bench` extra, skipped without it): mem0 and LangGraph's store.

The worker is the Procfile's (`dramatiq actors`, 2 processes x 8 threads), run as real processes.

Run: python bench/bench_sync.py [--memories 1000] [--search-sizes 10000,100000] [--write]
(uses REDIS_URL if set, else an embedded Redis; starts its own Chroma and embedding servers; writes
nothing outside a temporary directory and its own prefix; --write puts the table into BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test servers live in tests/support

from tests.support.embedding_server import EmbeddingServer, vector_for  # noqa: E402
from tests.support.services import Service, start_chroma, start_redis  # noqa: E402

DIMS = 1536
LATENCY_MS = 50
PROCESSES, THREADS = 2, 8
PLAIN_MESSAGES = 5000
SEARCHES = 200
#: The memories of (c) belong to this many namespaces (users), as in a bulk load of many users' memories.
NAMESPACES = 10
MARKER_START, MARKER_END = "<!-- bench_sync:start -->", "<!-- bench_sync:end -->"


@dataclass(frozen=True)
class Row:
    """One measured way of syncing."""

    name: str
    items: int
    seconds: float
    requests: int | None = None
    worker_cpu_s: float | None = None
    chroma_cpu_s: float | None = None

    @property
    def rate(self) -> float:
        return self.items / self.seconds

    def per_memory_ms(self, cpu_s: float | None) -> str:
        return "" if cpu_s is None else f"{cpu_s * 1000 / self.items:.2f}"


def main(argv: Sequence[str] | None = None) -> None:
    args = _arguments(argv)
    base = Path(tempfile.mkdtemp(prefix="memsync-bench-"))
    services = _services(base)
    server = EmbeddingServer(api_key="sk-bench", dimensions=DIMS).start()
    os.environ.update(OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=server.base_url)
    try:
        lines = Bench(server, services[-1], base, args.memories).run(args.search_sizes)
    finally:
        server.stop()
        for service in reversed(services):
            service.stop()
    print("\n".join(lines))
    if args.write:
        _write(lines)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--memories", type=int, default=1000)
    parser.add_argument("--search-sizes", default="10000,100000")
    parser.add_argument("--write", action="store_true", help="put the tables into BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.search_sizes = [int(size) for size in args.search_sizes.split(",") if size]
    return args


def _services(base: Path) -> list[Service]:
    services = []
    if not os.environ.get("REDIS_URL"):
        services.append(start_redis(base / "redis"))
        os.environ["REDIS_URL"] = services[-1].url
    services.append(start_chroma(base / "chroma"))
    os.environ.update(
        CHROMA_URL=services[-1].url,
        EMBEDDING_MODEL="bench",
        EMBEDDING_DIMENSIONS=str(DIMS),
        MEMSYNC_PREFIX=f"bench-{uuid.uuid4().hex[:8]}",
    )
    return services


class Bench:
    """The phases of one run, sharing the servers; each phase in namespaces of its own."""

    def __init__(self, server: EmbeddingServer, chroma: Service, base: Path, memories: int) -> None:
        self.server = server
        self.chroma = chroma
        self.base = base
        self.memories = memories
        self.peak_worker_mb = 0.0

    def run(self, search_sizes: list[int]) -> list[str]:
        import bench.ceiling  # noqa: F401  (declares the no-op actor on this process's broker)

        for n in range(self.memories):  # the test server's vectors, made before anything is timed
            vector_for(_text(n), DIMS)
        load = os.getloadavg()
        rows = [self._ceiling(), self._plain()]
        self.server.latency_ms = LATENCY_MS
        rows += [self._singles(coalesce_ms=0), self._singles(coalesce_ms=5)]
        rows += [self._singles(coalesce_ms=5, threads=32), self._batches(), self._import()]
        rows.append(self._chroma_ceiling())
        self.server.latency_ms = 0
        searches = [self._search(size) for size in search_sizes]
        peers = self._peers()
        return _report(rows, searches, peers, load, self.peak_worker_mb)

    # (a), (b)

    def _ceiling(self) -> Row:
        from bench.ceiling import noop

        with self._worker() as worker:
            return self._timed(
                "(a) no-op actor, result stored", PLAIN_MESSAGES, worker, lambda n: noop.send(f"k{n}", "v")
            )

    def _plain(self) -> Row:
        from actors import memory_sync

        def send(n: int) -> Any:
            return memory_sync.send(key=f"plain-{n}", value={"n": n}, namespace=f"plain-{n % 50}")

        with self._worker() as worker:
            return self._timed("(b) memory_sync, embed=False", PLAIN_MESSAGES, worker, send)

    # (c)

    def _singles(self, coalesce_ms: int, threads: int = THREADS) -> Row:
        from actors import memory_sync

        tag = f"single-{coalesce_ms}-{threads}"

        def send(n: int) -> Any:
            return memory_sync.send(
                key=f"m{n}", value=_text(n), embed=True, namespace=f"{tag}-{n % NAMESPACES}"
            )

        name = f"(c) single sends, coalescing {'on' if coalesce_ms else 'off'}"
        if threads != THREADS:
            name += f", {threads} threads"
        with self._worker(threads, MEMSYNC_COALESCE_MS=str(coalesce_ms)) as worker:
            return self._timed(name, self.memories, worker, send)

    def _batches(self, size: int = 100) -> Row:
        from actors import memory_sync_batch

        def items(start: int) -> list[dict[str, Any]]:
            return [
                {"key": f"m{n}", "value": _text(n), "embed": True, "namespace": f"batch-{n % NAMESPACES}"}
                for n in range(start, min(start + size, self.memories))
            ]

        with self._worker() as worker:
            count = (self.memories + size - 1) // size
            row = self._timed(
                f"(c) batch actor, {size} a message",
                count,
                worker,
                lambda b: memory_sync_batch.send(items=items(b * size)),
            )
        return Row(row.name, self.memories, row.seconds, row.requests, row.worker_cpu_s, row.chroma_cpu_s)

    def _import(self) -> Row:
        from actors import state
        from actors.transfer import import_lines

        lines = [
            (
                n + 1,
                {"key": f"m{n}", "value": _text(n), "embed": True, "namespace": f"import-{n % NAMESPACES}"},
            )
            for n in range(self.memories)
        ]
        with self._worker() as worker:
            self.server.clear_log()
            before = self._cpu(worker)
            started = time.perf_counter()
            summary = import_lines(lines, state.runtime(), batch_size=250, in_process=False)
            seconds = time.perf_counter() - started
            assert summary.counts["applied"] == self.memories, summary.as_dict()
            return self._row("(c) memsync import, 250 a batch", self.memories, seconds, worker, before)

    # (d)

    def _chroma_ceiling(self) -> Row:
        """Chroma's own batched upsert of the same vectors into one fresh collection, 500 a call."""
        import chromadb
        import numpy as np

        from actors import state

        vectors = state.runtime().memories.embedder.embed([_text(n) for n in range(self.memories)])
        host, port = self.chroma.url.rsplit("//", 1)[1].split(":")
        client = chromadb.HttpClient(host=host, port=int(port))
        collection = client.create_collection(
            f"ceiling-{uuid.uuid4().hex[:8]}",
            configuration={"hnsw": {"space": "cosine"}},
            embedding_function=None,
        )
        ids = [f"m{n}" for n in range(self.memories)]
        metadatas: Any = [
            {"key": i, "namespace": f"ns-{n % NAMESPACES}", "version": 1, "hash": "h"}
            for n, i in enumerate(ids)
        ]
        chroma_before = _tree_cpu_s(self.chroma.process.pid)
        started = time.perf_counter()
        for start in range(0, len(ids), 500):
            batch: Any = np.asarray(vectors[start : start + 500])
            collection.upsert(
                ids=ids[start : start + 500], embeddings=batch, metadatas=metadatas[start : start + 500]
            )
        seconds = time.perf_counter() - started
        chroma = _tree_cpu_s(self.chroma.process.pid) - chroma_before
        return Row(
            "(d) Chroma's own upsert, one collection, 500 a call", self.memories, seconds, None, None, chroma
        )

    # (e)

    def _search(self, size: int) -> tuple[int, list[float], list[float]]:
        from actors import state

        memories = state.runtime().memories
        _fill(memories, size, f"search{size}")
        namespaces = [f"search{size}-{n}" for n in range(0, size // 100)]
        queries = [(_text(n), namespaces[n % len(namespaces)]) for n in range(SEARCHES)]
        vector = memories.embedder.embed(["a query"])[0]
        bare = _latencies(lambda q: memories.index.query(q[1], vector, 5), queries)
        full = _latencies(lambda q: memories.search(q[0], k=5, namespace=q[1]), queries)
        return size, bare, full

    # (f)

    def _peers(self) -> list[Any]:
        try:
            from bench import peers
        except ImportError:
            return []
        texts = [_text(n) for n in range(self.memories)]
        self.server.latency_ms = LATENCY_MS
        host, port = self.chroma.url.rsplit("//", 1)[1].split(":")
        common: dict[str, Any] = {
            "base_url": self.server.base_url, "api_key": "sk-bench", "model": "bench", "dims": DIMS,
            "count_requests": lambda: len(self.server.embedding_requests),
        }  # fmt: skip
        try:
            return [
                peers.run_mem0(
                    texts, chroma_host=host, chroma_port=int(port), workdir=self.base / "mem0", **common
                ),
                peers.run_langgraph(texts, **common),
                peers.run_langgraph(texts, batch_size=100, **common),
            ]
        except ImportError:
            return []

    # Helpers.

    def _timed(
        self, name: str, count: int, worker: subprocess.Popen[bytes], send: Callable[[int], Any]
    ) -> Row:
        self.server.clear_log()
        before = self._cpu(worker)
        started = time.perf_counter()
        messages = [send(n) for n in range(count)]
        for message in messages:
            message.get_result(block=True, timeout=600_000)
        return self._row(name, count, time.perf_counter() - started, worker, before)

    def _row(
        self,
        name: str,
        count: int,
        seconds: float,
        worker: subprocess.Popen[bytes],
        before: tuple[float, float],
    ) -> Row:
        worker_cpu, chroma_cpu = self._cpu(worker)
        requests = len(self.server.embedding_requests)
        return Row(name, count, seconds, requests, worker_cpu - before[0], chroma_cpu - before[1])

    def _cpu(self, worker: subprocess.Popen[bytes]) -> tuple[float, float]:
        return _tree_cpu_s(worker.pid), _tree_cpu_s(self.chroma.process.pid)

    @contextmanager
    def _worker(self, threads: int = THREADS, **env: str) -> Iterator[subprocess.Popen[bytes]]:
        command = [
            str(Path(sys.executable).parent / "dramatiq"), "actors", "bench.ceiling",
            "--processes", str(PROCESSES), "--threads", str(threads),
        ]  # fmt: skip
        log = (self.base / "worker.log").open("ab")
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=log)
        try:
            _wait_for_workers(PROCESSES)
            yield process
            self.peak_worker_mb = max(self.peak_worker_mb, _tree_peak_mb(process.pid))
        finally:
            process.terminate()
            process.wait(timeout=60)
            log.close()
            _forget_heartbeats()


def _text(n: int) -> str:
    return f"memory {n}: the user likes topic {n % 37} and mentioned item {n * 7919 % 1000}"


def _fill(memories: Any, size: int, stem: str) -> None:
    """`size` memories in namespaces of 100, written to Redis and the index directly, random vectors."""
    import numpy as np

    from kvstore import KeyRef, Write, WriteMeta
    from vectorstore import IndexEntry

    rng = np.random.default_rng(size)
    for start in range(0, size, 1000):
        refs = [KeyRef(f"{stem}-{n // 100}", f"m{n}") for n in range(start, min(start + 1000, size))]
        writes = [
            Write(ref, "set", WriteMeta(), f'"{_text(n)}"', True, "h")
            for n, ref in zip(range(start, size), refs, strict=False)
        ]
        memories.store.write_many(writes)
        vectors = rng.standard_normal((len(refs), DIMS)).astype(np.float32)
        memories.index.upsert([IndexEntry(r.namespace, r.key, 1, "h") for r in refs], vectors)


def _latencies(call: Callable[[Any], Any], queries: list[Any]) -> list[float]:
    samples = []
    for query in queries[:20]:
        call(query)  # warm-up
    for query in queries:
        started = time.perf_counter()
        call(query)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _wait_for_workers(count: int, timeout_s: float = 120.0) -> None:
    from actors import state
    from actors.liveness import live_workers

    runtime = state.runtime()
    deadline = time.monotonic() + timeout_s
    timeout_ms = runtime.settings.heartbeat_timeout_ms
    while len(live_workers(runtime.redis, runtime.keys.workers(), timeout_ms)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the benchmark's worker did not start")
        time.sleep(0.2)
    time.sleep(1.0)  # each process's consumer threads are up shortly after its first beat (at boot)


def _forget_heartbeats() -> None:
    from actors import state

    runtime = state.runtime()
    runtime.redis.delete(runtime.keys.workers())


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending += children.get(current, [])
    return found


def _tree_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process and its descendants (including reaped children)."""
    total = 0.0
    for member in _tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def _tree_peak_mb(pid: int) -> float:
    peak = 0.0
    for member in _tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]) / 1024)
    return peak


def _percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100)[int(q) - 1] if len(samples) > 1 else samples[0]


def _report(
    rows: list[Row],
    searches: list[tuple[int, list[float], list[float]]],
    peers: list[Any],
    load: Any,
    peak: float,
) -> list[str]:
    ceiling, plain = rows[0], rows[1]
    singles_off = next(r for r in rows if "coalescing off" in r.name)
    chroma = rows[-1]
    lines = [
        f"Machine: {os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}; "
        f"load average before the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.",
        f"Worker: `dramatiq actors`, {PROCESSES} processes x {THREADS} threads; embeddings of {DIMS} "
        f"dimensions from the test server, {LATENCY_MS} ms per request for (c), (d) and (f); "
        f"the memories of (c) in {NAMESPACES} namespaces; the index in {_shards()} shards.",
        "",
        "| run | memories | memories/s | ratio | embedding requests per 1,000 "
        "| worker CPU ms/memory | Chroma CPU ms/memory |",
        "|---|---|---|---|---|---|---|",
        _line(ceiling, "1.00 of (a)"),
        _line(plain, f"{plain.rate / ceiling.rate:.2f} of (a)"),
    ]
    for row in rows[2:-1]:
        ratio = f"{row.rate / singles_off.rate:.1f}x the uncoalesced; {row.rate / chroma.rate:.2f} of (d)"
        lines.append(_line(row, ratio))
    lines.append(_line(chroma, "1.00 of (d)"))
    lines += ["", "| search, namespace-scoped, k=5 | memories | p50 ms | p95 ms |", "|---|---|---|---|"]
    for size, bare, full in searches:
        for name, samples in (("bare Chroma query", bare), ("search() (embed, query, join)", full)):
            p50, p95 = _percentile(samples, 50), _percentile(samples, 95)
            lines.append(f"| {name} | {size:,} | {p50:.1f} | {p95:.1f} |")
    lines += ["", f"Workers' peak memory (largest process): {peak:.0f} MB."]
    if peers:
        lines += _peer_lines(peers, rows)
    return lines


def _shards() -> int:
    from actors import state

    return state.settings().index_shards


def _line(row: Row, ratio: str) -> str:
    requests = "" if row.requests is None else f"{row.requests * 1000 / row.items:.0f}"
    return (
        f"| {row.name} | {row.items:,} | {row.rate:,.0f} | {ratio} | {requests} | "
        f"{row.per_memory_ms(row.worker_cpu_s)} | {row.per_memory_ms(row.chroma_cpu_s)} |"
    )


def _peer_lines(peers: list[Any], rows: list[Row]) -> list[str]:
    best = max(rows[2:-1], key=lambda row: row.rate)
    lines = [
        "",
        "| peer, same memories and server | memories/s | requests per 1,000 | search p50/p95 ms "
        f"| memsync's best ({best.name[4:]}) over it |",
        "|---|---|---|---|---|",
    ]
    for peer in peers:
        lines.append(
            f"| {peer.peer} | {peer.memories_per_s:,.1f} | {peer.requests_per_1000:.0f} | "
            f"{peer.search_p50_ms:.1f}/{peer.search_p95_ms:.1f} | {best.rate / peer.memories_per_s:.1f}x |"
        )
    return lines


def _write(lines: list[str]) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8")
    head, _, rest = text.partition(MARKER_START)
    _, _, tail = rest.partition(MARKER_END)
    body = "\n".join([MARKER_START, *lines, MARKER_END])
    path.write_text(head + body + tail, encoding="utf-8")


if __name__ == "__main__":
    main()
