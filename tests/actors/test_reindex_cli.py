"""`memsync reindex` through the real `memsync` entry point, as separate processes, on the test services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kvstore import Keys, MemoryStore
from tests.conftest import API_KEY
from tests.support.embedding_server import EmbeddingServer
from tests.support.worker import wait_until
from vectorstore.active import ActiveIndexes, IndexSpec, Migration, specs_in_chroma
from vectorstore.embedder import OpenAIEmbedder
from vectorstore.index import DEFAULT_SHARDS, chroma_client
from vectorstore.sync import SyncItem

MEMSYNC = str(Path(sys.executable).parent / "memsync")
OLD = IndexSpec("test-embedding", None)
NEW = IndexSpec("test-embedding-v2", 32)
MEMORIES = 40


@pytest.fixture
def environment(prefix: str, chroma_url: str) -> Iterator[dict[str, str]]:
    """The environment of a `memsync` whose EMBEDDING_MODEL is the new model, on this test's prefix."""
    yield {
        **os.environ,
        "MEMSYNC_PREFIX": prefix,
        "EMBEDDING_MODEL": NEW.model,
        "EMBEDDING_DIMENSIONS": str(NEW.dimensions),
        "MEMSYNC_INDEX_CHECK_MS": "100",
    }
    client = chroma_client(chroma_url)
    for names in specs_in_chroma(client, prefix, DEFAULT_SHARDS).values():
        for name in names:
            client.delete_collection(name)


@pytest.fixture
def seeded(
    redis_client: redis.Redis, chroma_url: str, prefix: str, embedding_service: EmbeddingServer
) -> None:
    """MEMORIES embedded memories in namespace `ns`, indexed with the old model, which is the active one."""
    indexes = ActiveIndexes(
        MemoryStore(redis_client, prefix=prefix),
        chroma_client(chroma_url),
        lambda spec: OpenAIEmbedder(api_key=API_KEY, model=spec.model, base_url=embedding_service.base_url),
        default=OLD,
        prefix=prefix,
    )
    items = [
        SyncItem(f"k{n:03d}", f"memory {n}: the user likes colour{n}", "ns", embed=True)
        for n in range(MEMORIES)
    ]
    assert not any(isinstance(result, Exception) for result in indexes.memories().sync_many(items))


def _memsync(env: dict[str, str], *args: str) -> Any:
    done = subprocess.run([MEMSYNC, *args, "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _migration(client: redis.Redis, prefix: str) -> Migration | None:
    raw = client.get(Keys(prefix).reindex())
    return Migration.from_json(raw) if raw else None


def _inputs(server: EmbeddingServer, spec: IndexSpec) -> int:
    return sum(r.inputs for r in server.embedding_requests if r.model == spec.model and r.status == 200)


@pytest.mark.usefixtures("seeded")
def test_a_killed_reindex_resumes_where_it_stopped_and_search_follows_the_switch(
    environment: dict[str, str], redis_client: redis.Redis, prefix: str, embedding_service: EmbeddingServer
) -> None:
    embedding_service.latency_ms = 200
    embedding_service.clear_log()
    run = subprocess.Popen(
        [MEMSYNC, "reindex", "--batch-size", "4", "--json"], env=environment, stdout=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: (m := _migration(redis_client, prefix)) and m.done >= 8, 60, "two batches copied")
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
    killed_at = _migration(redis_client, prefix)
    assert killed_at is not None and 8 <= killed_at.done < MEMORIES and killed_at.phase == "copying"

    embedding_service.latency_ms = 0
    embedding_service.clear_log()
    hits = _memsync(environment, "search", "the user likes colour7", "-k", "1", "--namespace", "ns")
    assert [hit["key"] for hit in hits] == ["k007"]
    assert [r.model for r in embedding_service.embedding_requests] == [OLD.model]  # still the old index

    embedding_service.clear_log()
    summary = _memsync(environment, "reindex", "--batch-size", "4")
    # A batch the kill interrupted may be embedded again; none saved in the checkpoint is.
    assert MEMORIES - killed_at.done - 4 <= _inputs(embedding_service, NEW) <= MEMORIES - killed_at.done
    assert (summary["resumed_at"], summary["keys"], summary["switched"]) == (killed_at.done, MEMORIES, True)
    assert _migration(redis_client, prefix) is None

    embedding_service.clear_log()
    hits = _memsync(environment, "search", "the user likes colour7", "-k", "1", "--namespace", "ns")
    assert [hit["key"] for hit in hits] == ["k007"]
    assert [(r.model, r.dimensions) for r in embedding_service.embedding_requests] == [(NEW.model, 32)]


@pytest.mark.usefixtures("seeded")
def test_reindex_drop_old_removes_the_old_models_collections(
    environment: dict[str, str], chroma_url: str, prefix: str
) -> None:
    old_names = specs_in_chroma(chroma_client(chroma_url), prefix, DEFAULT_SHARDS)[OLD]

    summary = _memsync(environment, "reindex", "--drop-old")

    assert summary["switched"] and summary["keys"] == MEMORIES
    assert summary["dropped"] == sorted(old_names)
    assert set(specs_in_chroma(chroma_client(chroma_url), prefix, DEFAULT_SHARDS)) == {NEW}
    again = _memsync(environment, "reindex", "--drop-old")
    assert (again["switched"], again["dropped"]) == (False, [])


def test_a_bad_batch_size_is_refused_with_one_line(environment: dict[str, str]) -> None:
    done = subprocess.run(
        [MEMSYNC, "reindex", "--batch-size", "0"], env=environment, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr) == (2, "error: --batch-size must be from 1 to 2048\n")


@pytest.mark.usefixtures("seeded")
def test_a_process_that_cannot_embed_with_the_model_in_use_says_so_in_one_line(
    environment: dict[str, str],
) -> None:
    offline = {**environment, "MEMSYNC_EMBEDDER": "local"}
    done = subprocess.run(
        [MEMSYNC, "search", "colour", "--namespace", "ns"],
        env=offline,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: ReindexError: the index in use was made with test-embedding (native dimensions), which needs"
        " OPENAI_API_KEY (and OPENAI_BASE_URL) here too"
    ]
