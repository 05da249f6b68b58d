"""What a long text costs to sync: chunks, splitting, embedding and index writes, beside a short text.

Every sync goes through `Memories.sync` (Redis, a `chroma run` server, the openai SDK against the
test embedding server with no added latency, or the local model in-process). Per text length: the
chunks made, the wall time of a sync of a new text, of an update to another text of that length,
and of a change of metadata alone (a relabel of every chunk, no embedding); how much of a sync is
splitting (`Chunker.split`); and the ratio to a one-chunk text, measured in the same run.

Run: python bench/bench_chunks.py [--write]   (uses REDIS_URL if set, else an embedded Redis;
starts its own Chroma and embedding servers; --write puts the table into BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test servers live in tests/support

from kvstore import MemoryStore
from tests.support.embedding_server import EmbeddingServer
from tests.support.services import Service, start_chroma, start_redis
from vectorstore import Memories, OpenAIEmbedder, VectorIndex, chroma_client
from vectorstore.embedder import Embedder

ROOT = Path(__file__).resolve().parents[1]
MARKER_START, MARKER_END = "<!-- bench_chunks:start -->", "<!-- bench_chunks:end -->"
API_KEY = "sk-bench"
REPEATS = 5
#: A few sentences over and over, about 10 tokens each.
SENTENCES = (
    "The committee met again on a grey morning. ",
    "Minutes were read and approved without comment. ",
    "Someone asked about the budget, and nobody answered. ",
    "The coffee was cold, as usual. ",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    args = parser.parse_args()
    with _services() as (redis_url, chroma_url, server):
        rows = _openai_rows(redis_url, chroma_url, server) + _local_rows(redis_url, chroma_url)
    lines = _table(rows)
    print("\n".join(lines))
    if args.write:
        _write(lines)


@contextmanager
def _services() -> Iterator[tuple[str, str, EmbeddingServer]]:
    base = Path(tempfile.mkdtemp(prefix="memsync-chunks-"))
    services: list[Service] = []
    url = os.environ.get("REDIS_URL")
    if not url:
        services.append(start_redis(base / "redis"))
        url = services[-1].url
    services.append(start_chroma(base / "chroma"))
    server = EmbeddingServer(api_key=API_KEY).start()
    try:
        yield url, services[-1].url, server
    finally:
        server.stop()
        for service in reversed(services):
            service.stop()


def _openai_rows(redis_url: str, chroma_url: str, server: EmbeddingServer) -> list[dict[str, object]]:
    embedder = OpenAIEmbedder(api_key=API_KEY, model="bench-embedding", base_url=server.base_url)
    return [
        _measure("OpenAI API (cl100k, 8,191)", embedder, redis_url, chroma_url, n)
        for n in (500, 8_000, 30_000, 100_000)
    ]


def _local_rows(redis_url: str, chroma_url: str) -> list[dict[str, object]]:
    from vectorstore.local_model import LocalMiniLM

    embedder = LocalMiniLM()
    embedder.embed(["warm up"])
    return [
        _measure("local model (254 word pieces)", embedder, redis_url, chroma_url, n)
        for n in (200, 2_500, 10_000)
    ]


def _measure(
    label: str, embedder: Embedder, redis_url: str, chroma_url: str, tokens: int
) -> dict[str, object]:
    prefix = f"bench-chunks-{uuid.uuid4().hex[:8]}"
    store = MemoryStore(redis.Redis.from_url(redis_url), prefix=prefix)
    index = VectorIndex(chroma_client(chroma_url), model=embedder.model, dimensions=None, prefix=prefix)
    memories = Memories(store, index, embedder)
    try:
        return _row(label, memories, tokens)
    finally:
        index.drop_all()


def _row(label: str, memories: Memories, tokens: int) -> dict[str, object]:
    texts = [_text(tokens, n) for n in range(2 * REPEATS + 1)]
    memories.sync("warm", texts[-1], embed=True)
    chunker = memories.embedder.chunker
    new = _median(lambda n: memories.sync(f"k{n}", texts[n], embed=True))
    update = _median(lambda n: memories.sync(f"k{n}", texts[REPEATS + n], embed=True))
    relabel = _median(lambda n: memories.sync(f"k{n}", texts[REPEATS + n], embed=True, metadata={"v": 2}))
    split = _median(lambda n: chunker.split(texts[n]))
    return {
        "model": label,
        "tokens": chunker.count(texts[0]),
        "chunks": len(chunker.split(texts[0])),
        "new_ms": new,
        "update_ms": update,
        "relabel_ms": relabel,
        "split_ms": split,
    }


def _median(action: Callable[[int], object]) -> float:
    times = []
    for n in range(REPEATS):
        started = time.perf_counter()
        action(n)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _text(tokens: int, variant: int) -> str:
    """About `tokens` tokens of sentences; `variant` makes each text its own (a different hash)."""
    body = "".join(SENTENCES[i % len(SENTENCES)] for i in range(max(1, tokens // 10)))
    return f"Record {variant}. {body}"


def _table(rows: list[dict[str, object]]) -> list[str]:
    lines = [
        "| embedder | tokens | chunks | new text, ms | ratio to the shortest | other text, ms "
        "| metadata only, ms | of which splitting, ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base: dict[object, float] = {}
    for row in rows:
        first = base.setdefault(row["model"], float(row["new_ms"]))  # type: ignore[arg-type]
        lines.append(
            f"| {row['model']} | {row['tokens']:,} | {row['chunks']} | {row['new_ms']:.1f} | "
            f"{float(row['new_ms']) / first:.1f}x | {row['update_ms']:.1f} | {row['relabel_ms']:.1f} | "  # type: ignore[arg-type]
            f"{row['split_ms']:.1f} |"
        )
    return lines


def _write(lines: list[str]) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    block = "\n".join([MARKER_START, *lines, MARKER_END])
    if MARKER_START in text:
        head, rest = text.split(MARKER_START, 1)
        text = head + block + rest.split(MARKER_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Long texts in chunks\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
