"""Two costs BENCHMARKS.md reasons from, measured on their own.

- Chroma's server CPU per write request, by vectors per request and by writers at once (one
  `chroma run`, 1,536 dimensions, a fresh collection per case; upserts with memsync's metadata).
- memsync's own CPU per plain sync, in one thread, in-process: `perform("MEMORY_SYNC", ...)`, the
  job the worker runs, without Dramatiq around it.

Run: python bench/bench_costs.py   (uses REDIS_URL if set, else an embedded Redis; starts its own
Chroma server; writes nothing outside a temporary directory and its own prefix)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test servers live in tests/support

from tests.support.services import Service, start_chroma, start_redis

DIMS = 1536
PLAIN_SYNCS = 3000


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="memsync-costs-"))
    services: list[Service] = []
    if not os.environ.get("REDIS_URL"):
        services.append(start_redis(base / "redis"))
        os.environ["REDIS_URL"] = services[-1].url
    chroma = start_chroma(base / "chroma")
    services.append(chroma)
    try:
        print(f"Chroma server CPU per upsert request, {DIMS} dimensions:")
        _chroma_writes(chroma)
        print("memsync's own CPU per plain sync, one thread, in-process:")
        _plain_sync(chroma.url)
    finally:
        for service in reversed(services):
            service.stop()


def _chroma_writes(chroma: Service) -> None:
    import chromadb

    host, port = chroma.url.rsplit("//", 1)[1].split(":")
    client = chromadb.HttpClient(host=host, port=int(port))
    rng = np.random.default_rng(0)
    for per_request, writers in ((10, 1), (100, 1), (500, 1), (10, 2), (10, 8), (10, 16)):
        requests = 160 if per_request == 10 else 2000 // per_request
        collections = [
            client.create_collection(
                f"c{uuid.uuid4().hex[:12]}",
                configuration={"hnsw": {"space": "cosine"}},
                embedding_function=None,
            )
            for _ in range(16)
        ]

        def write(n: int, collections: list[Any] = collections, size: int = per_request) -> None:
            ids = [f"{n}-{i}" for i in range(size)]
            metadatas: Any = [{"namespace": "x", "key": i, "version": 1, "hash": "h"} for i in ids]
            vectors: Any = rng.standard_normal((size, DIMS)).astype(np.float32)
            collections[n % 16].upsert(ids=ids, embeddings=vectors, metadatas=metadatas)

        before, started = _cpu_s(chroma.process.pid), time.perf_counter()
        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(write, range(requests)))
        cpu, wall = _cpu_s(chroma.process.pid) - before, time.perf_counter() - started
        print(
            f"  {per_request:4d} vectors a request, {writers:2d} writers at once: "
            f"{cpu / requests * 1000:6.1f} ms a request, "
            f"{cpu / (requests * per_request) * 1000:5.2f} ms a vector; "
            f"{requests} requests in {wall:.2f} s"
        )


def _plain_sync(chroma_url: str) -> None:
    os.environ.update(CHROMA_URL=chroma_url, MEMSYNC_PREFIX=f"costs-{uuid.uuid4().hex[:8]}")
    from actors.tasks import perform
    from kvstore import WriteMeta

    def run(count: int, tag: str) -> None:
        for n in range(count):
            fields = {"key": f"{tag}{n}", "value": {"n": n}, "namespace": f"p{n % 50}"}
            perform("MEMORY_SYNC", (), fields, WriteMeta(f"{tag}-{n}", 1000 + n), 0)

    run(300, "warm")
    cpu, started = time.process_time(), time.perf_counter()
    run(PLAIN_SYNCS, "timed")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - started
    print(f"  {cpu / PLAIN_SYNCS * 1000:.3f} ms CPU, {wall / PLAIN_SYNCS * 1000:.3f} ms wall per message")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:13]) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
