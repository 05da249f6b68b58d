"""Peer memory stores fed the same memories through the same embedding server: mem0 and LangGraph's store.

Each peer writes the memories the way its documentation shows, one call per memory (and LangGraph's
`batch` of `PutOp`s as well), then answers the same queries. Measured per peer: memories/s, embedding
requests per 1,000 memories (when given a request counter), search p50/p95, and how many queries found
the memory they were about as the top hit.

- mem0: `Memory.from_config` with its Chroma vector store on a Chroma server, its OpenAI embedder on
  the given base URL with `embedding_dims`, `add(text, user_id=..., infer=False)`. Its LLM config points
  at the same base URL: with `infer=False` it must never be called (the server logs any such request).
  mem0 reads `MEM0_TELEMETRY` and `MEM0_DIR` once, at import: `run_mem0` sets the first to False (no
  PostHog events, no remote notice config) and the second to a folder under `workdir` unless set.
- LangGraph: `InMemoryStore` indexing the `text` field, its `embed` a function over the openai SDK (one
  request per call), so no langchain-openai is needed.

Run: python bench/peers.py [--memories 1000] [--searches 100] [--latency-ms 50]
(starts its own Chroma server and embedding server; writes nothing outside a temporary directory)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test servers live in tests/support

if TYPE_CHECKING:
    import openai
    from langgraph.store.memory import InMemoryStore

__all__ = [
    "OpenAIEmbed",
    "PeerResult",
    "RequestCount",
    "main",
    "make_queries",
    "make_texts",
    "run_langgraph",
    "run_mem0",
]

MEMORIES = 1000
SEARCHES = 100
LATENCY_MS = 50
BATCH_SIZE = 100
LIMIT = 5
TOPICS = 37
USER_ID = "bench-user"
NAMESPACE = ("bench", USER_ID)
API_KEY = "sk-bench-peers"
MODEL = "text-embedding-3-small"
_INSTALL_HINT = "install the bench extra: pip install -e '.[bench]'"

#: How many embedding requests the server has answered so far (e.g. `len(server.embedding_requests)`).
RequestCount = Callable[[], int]


@dataclass(frozen=True)
class PeerResult:
    """One peer's measurements over the same memories and queries."""

    peer: str
    memories: int
    write_s: float
    #: Embedding requests made while writing; None when no request counter was given.
    embedding_requests: int | None
    #: Each query's latency, in order.
    search_ms: tuple[float, ...]
    #: Queries whose top hit was the memory text they are the tail of.
    relevant_top_hits: int

    @property
    def memories_per_s(self) -> float:
        return self.memories / self.write_s

    @property
    def requests_per_1000(self) -> float | None:
        if self.embedding_requests is None:
            return None
        return self.embedding_requests * 1000 / self.memories

    @property
    def search_p50_ms(self) -> float:
        return statistics.median(self.search_ms)

    @property
    def search_p95_ms(self) -> float:
        if len(self.search_ms) < 2:
            return self.search_ms[0]
        return statistics.quantiles(self.search_ms, n=20, method="inclusive")[18]


def make_texts(count: int) -> list[str]:
    """The memories: `memory N: the user likes topic K`, over `TOPICS` topics."""
    return [f"memory {n}: the user likes topic {n % TOPICS}" for n in range(count)]


def make_queries(count: int) -> list[str]:
    """Queries that are the tail of some memories, `the user likes topic K`, cycling over the topics."""
    return [f"the user likes topic {n % TOPICS}" for n in range(count)]


# --- mem0 ----------------------------------------------------------------------------------------


def run_mem0(
    texts: Sequence[str],
    *,
    base_url: str,
    api_key: str,
    model: str,
    dims: int,
    chroma_host: str,
    chroma_port: int,
    workdir: Path,
    queries: Sequence[str] | None = None,
    count_requests: RequestCount | None = None,
) -> PeerResult:
    """Add each text with mem0's `add(infer=False)`, then search; a fresh Chroma collection per call.

    mem0's history database goes under `workdir`, which the caller owns.
    """
    openai_config = {"model": model, "api_key": api_key, "openai_base_url": base_url}
    collection = f"mem0-bench-{uuid.uuid4().hex[:8]}"
    config = _mem0_config(openai_config, dims, (chroma_host, chroma_port), collection, workdir)
    memory = _mem0_class(workdir).from_config(config)

    def search(query: str) -> list[str]:
        found = memory.search(query, top_k=LIMIT, filters={"user_id": USER_ID})
        return [str(hit["memory"]) for hit in found["results"]]

    write_s, requests = _measure_writes(lambda: _mem0_add_each(memory, texts), count_requests)
    return _result("mem0 add(infer=False)", len(texts), write_s, requests, search, queries)


def _mem0_config(
    openai_config: dict[str, str], dims: int, chroma: tuple[str, int], collection: str, workdir: Path
) -> dict[str, Any]:
    host, port = chroma
    return {
        "vector_store": {
            "provider": "chroma",
            "config": {"collection_name": collection, "host": host, "port": port},
        },
        "embedder": {"provider": "openai", "config": {**openai_config, "embedding_dims": dims}},
        # mem0 builds an LLM client even when nothing will call it; point it at the same server.
        "llm": {"provider": "openai", "config": openai_config},
        "history_db_path": str(workdir / "mem0-history.db"),
    }


def _mem0_class(workdir: Path) -> Any:
    # Read by mem0 once, at import: no PostHog events, no notice fetched from GitHub, no ~/.mem0.
    os.environ["MEM0_TELEMETRY"] = "False"
    os.environ.setdefault("MEM0_DIR", str(workdir / "mem0-home"))
    try:
        from mem0 import Memory
    except ImportError as err:
        raise ImportError(f"mem0 is not installed: {_INSTALL_HINT}") from err
    return Memory


def _mem0_add_each(memory: Any, texts: Sequence[str]) -> None:
    for text in texts:
        memory.add(text, user_id=USER_ID, infer=False)


# --- LangGraph -----------------------------------------------------------------------------------


class OpenAIEmbed:
    """LangGraph's `EmbeddingsFunc` over the openai SDK: one request per call, vectors in input order.

    A call carries at most 2,048 texts (OpenAI's limit); the store embeds one `batch` per call.
    """

    def __init__(self, client: openai.OpenAI, model: str, dims: int) -> None:
        self._client = client
        self._model = model
        self._dims = dims

    def __call__(self, texts: Sequence[str]) -> list[list[float]]:
        response = self._client.embeddings.create(
            model=self._model, input=list(texts), dimensions=self._dims, encoding_format="float"
        )
        return [item.embedding for item in sorted(response.data, key=lambda item: item.index)]


def run_langgraph(
    texts: Sequence[str],
    *,
    base_url: str,
    api_key: str,
    model: str,
    dims: int,
    batch_size: int | None = None,
    queries: Sequence[str] | None = None,
    count_requests: RequestCount | None = None,
) -> PeerResult:
    """Write each text into a fresh `InMemoryStore`, then search it.

    `batch_size` None: one `put` per text; else `batch` of that many `PutOp`s at a time.
    """
    import openai

    embed = OpenAIEmbed(openai.OpenAI(base_url=base_url, api_key=api_key), model, dims)
    store = _langgraph_store(embed, dims)

    def write() -> None:
        if batch_size is None:
            _put_each(store, texts)
        else:
            _put_in_batches(store, texts, batch_size)

    def search(query: str) -> list[str]:
        return [str(item.value["text"]) for item in store.search(NAMESPACE, query=query, limit=LIMIT)]

    peer = "LangGraph put" if batch_size is None else f"LangGraph batch({batch_size})"
    write_s, requests = _measure_writes(write, count_requests)
    return _result(peer, len(texts), write_s, requests, search, queries)


def _langgraph_store(embed: OpenAIEmbed, dims: int) -> InMemoryStore:
    try:
        from langgraph.store.memory import InMemoryStore
    except ImportError as err:
        raise ImportError(f"langgraph is not installed: {_INSTALL_HINT}") from err
    return InMemoryStore(index={"dims": dims, "embed": embed, "fields": ["text"]})


def _put_each(store: InMemoryStore, texts: Sequence[str]) -> None:
    for n, text in enumerate(texts):
        store.put(NAMESPACE, f"m{n}", {"text": text})


def _put_in_batches(store: InMemoryStore, texts: Sequence[str], size: int) -> None:
    from langgraph.store.base import PutOp

    ops = [PutOp(NAMESPACE, f"m{n}", {"text": text}) for n, text in enumerate(texts)]
    for start in range(0, len(ops), size):
        store.batch(ops[start : start + size])


# --- measuring -----------------------------------------------------------------------------------


def _measure_writes(
    write: Callable[[], None], count_requests: RequestCount | None
) -> tuple[float, int | None]:
    before = count_requests() if count_requests else 0
    started = time.perf_counter()
    write()
    write_s = time.perf_counter() - started
    return write_s, (count_requests() - before) if count_requests else None


def _result(
    peer: str,
    memories: int,
    write_s: float,
    requests: int | None,
    search: Callable[[str], list[str]],
    queries: Sequence[str] | None,
) -> PeerResult:
    latencies: list[float] = []
    relevant = 0
    for query in queries if queries is not None else make_queries(SEARCHES):
        started = time.perf_counter()
        hits = search(query)
        latencies.append((time.perf_counter() - started) * 1000)
        relevant += bool(hits) and hits[0].endswith(query)
    return PeerResult(peer, memories, write_s, requests, tuple(latencies), relevant)


# --- the benchmark -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Start an embedding server and a Chroma server, run every peer, print a table."""
    args = _arguments(argv)
    base = Path(tempfile.mkdtemp(prefix="memsync-peers-"))
    try:
        _run(args.memories, args.searches, args.latency_ms, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="mem0 and LangGraph's store on the same memories.")
    parser.add_argument("--memories", type=int, default=MEMORIES)
    parser.add_argument("--searches", type=int, default=SEARCHES)
    parser.add_argument("--latency-ms", type=int, default=LATENCY_MS)
    return parser.parse_args(argv)


def _run(memories: int, searches: int, latency_ms: int, base: Path) -> None:
    from tests.support.embedding_server import DEFAULT_DIMENSIONS, EmbeddingServer
    from tests.support.services import start_chroma

    chroma = start_chroma(base / "chroma")
    try:
        with EmbeddingServer(api_key=API_KEY, latency_ms=latency_ms) as server:
            common: dict[str, Any] = {
                "base_url": server.base_url,
                "api_key": API_KEY,
                "model": MODEL,
                "dims": DEFAULT_DIMENSIONS,
                "queries": make_queries(searches),
                "count_requests": lambda: len(server.embedding_requests),
            }
            results = _run_peers(make_texts(memories), _host_port(chroma.url), base, common)
            others = len(server.requests) - len(server.embedding_requests)
    finally:
        chroma.stop()
    _print_table(results, latency_ms, DEFAULT_DIMENSIONS, others)


def _run_peers(
    texts: Sequence[str], chroma: tuple[str, int], workdir: Path, common: dict[str, Any]
) -> list[PeerResult]:
    host, port = chroma
    return [
        run_mem0(texts, chroma_host=host, chroma_port=port, workdir=workdir, **common),
        run_langgraph(texts, **common),
        run_langgraph(texts, batch_size=BATCH_SIZE, **common),
    ]


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 8000


def _print_table(results: Sequence[PeerResult], latency_ms: int, dims: int, others: int) -> None:
    first = results[0]
    print(
        f"{first.memories} memories, {len(first.search_ms)} searches (limit {LIMIT}), one thread; "
        f"embedding server at {latency_ms} ms per request, {dims} dims"
    )
    print(f"{'peer':<24}{'memories/s':>12}{'requests/1000':>15}{'p50 ms':>9}{'p95 ms':>9}{'top hit':>10}")
    for result in results:
        requests = "-" if result.requests_per_1000 is None else f"{result.requests_per_1000:.0f}"
        top = f"{result.relevant_top_hits}/{len(result.search_ms)}"
        print(
            f"{result.peer:<24}{result.memories_per_s:>12.1f}{requests:>15}"
            f"{result.search_p50_ms:>9.1f}{result.search_p95_ms:>9.1f}{top:>10}"
        )
    print(f"requests other than embeddings (an LLM call would be one): {others}")


if __name__ == "__main__":
    main()
