"""Syncs per second through a real broker and worker, against the framework's ceiling; search overhead.

One run, one machine, ratios side by side:
- Dramatiq's ceiling: a no-op actor on the same Redis broker, the same worker, the same threads;
- memory_sync without embedding (validation, one Lua write, the index step deleting nothing);
- memory_sync with embed=True against the local OpenAI-compatible test server (no latency);
- search(): embedding the query, querying Chroma, joining with Redis, against the bare Chroma query.

Run: python bench/bench_sync.py   (uses REDIS_URL if set, else an embedded Redis; starts its own
Chroma server and embedding server; writes nothing outside a temporary directory and its own prefix)
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test servers live in tests/support

from tests.support.embedding_server import EmbeddingServer
from tests.support.services import Service, start_chroma, start_redis

MESSAGES = 1000
THREADS = 8
SEARCHES = 200
INDEXED = 1000


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="memsync-bench-"))
    services = _environment(base)
    with EmbeddingServer(api_key="sk-bench") as server:
        os.environ.update(OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=server.base_url)
        try:
            _run()
        finally:
            for service in services:
                service.stop()


def _environment(base: Path) -> list[Service]:
    services = []
    if not os.environ.get("REDIS_URL"):
        services.append(start_redis(base / "redis"))
        os.environ["REDIS_URL"] = services[-1].url
    services.append(start_chroma(base / "chroma"))
    os.environ.update(
        CHROMA_URL=services[-1].url, EMBEDDING_MODEL="bench", MEMSYNC_PREFIX=f"bench-{uuid.uuid4().hex[:8]}"
    )
    return services


def _run() -> None:
    import dramatiq

    import actors
    from actors import memory_sync

    @dramatiq.actor(queue_name=memory_sync.queue_name, store_results=False)
    def noop(key: str, value: Any, embed: bool = False) -> None:
        return None

    worker = dramatiq.Worker(actors.broker, worker_threads=THREADS, worker_timeout=50)
    worker.start()
    try:
        ceiling = _rate(lambda n: noop.send(f"k{n}", "v"))
        plain = _rate(lambda n: memory_sync.send(key=f"plain-{n}", value={"n": n}, namespace="bench"))
        embedded = _rate(
            lambda n: memory_sync.send(
                key=f"emb-{n}", value=f"memory number {n}", embed=True, namespace="bench"
            )
        )
    finally:
        worker.stop()
    _print_rates(ceiling, plain, embedded)
    _print_search()


def _rate(send: Callable[[int], Any]) -> float:
    import actors
    from actors import memory_sync

    started = time.perf_counter()
    for n in range(MESSAGES):
        send(n)
    actors.broker.join(memory_sync.queue_name, timeout=600_000)
    return MESSAGES / (time.perf_counter() - started)


def _print_rates(ceiling: float, plain: float, embedded: float) -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{MESSAGES} messages each, {THREADS} worker threads, one process, Redis broker")
    print(f"  no-op actor (Dramatiq's ceiling):  {ceiling:8.0f} msg/s  1.00")
    print(f"  memory_sync, embed=False:          {plain:8.0f} msg/s  {plain / ceiling:.2f}")
    print(f"  memory_sync, embed=True:           {embedded:8.0f} msg/s  {embedded / ceiling:.2f}")


def _print_search() -> None:
    from actors import state
    from vectorstore.reconcile import reconcile

    memories = state.runtime().memories
    for n in range(INDEXED):
        memories.store.set(f"s-{n}", f"note {n} about topic {n % 37}", namespace="search", embed=True)
    reconcile(memories, ["search"])  # indexes every key from Redis
    vector = memories.embedder.embed(["topic 5"])[0]
    bare = _timed(lambda: memories.index.query("search", vector, 5))
    full = _timed(lambda: memories.search("topic 5", k=5, namespace="search"))
    print(f"search over {INDEXED} vectors, k=5, {SEARCHES} calls (p50):")
    print(f"  bare Chroma query:            {bare * 1000:6.2f} ms  1.00")
    print(f"  search() (embed+query+join):  {full * 1000:6.2f} ms  {full / bare:.2f}")


def _timed(call: Callable[[], Any]) -> float:
    samples = []
    for _ in range(SEARCHES):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


if __name__ == "__main__":
    main()
