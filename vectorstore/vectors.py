"""The vectors of a key's text: one per chunk, embedded together, labelled for the index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvstore import Record
from vectorstore.chunks import Chunk
from vectorstore.embedder import Embedder
from vectorstore.errors import EmbeddingRejected, VectorStoreError
from vectorstore.index import IndexEntry, Vectors

__all__ = ["KeyVectors", "embed_texts", "entries_for", "relabelled"]


@dataclass(frozen=True)
class KeyVectors:
    """The vectors of one text: row `i` of `rows` is the embedding of `chunks[i]`."""

    chunks: list[Chunk]
    rows: Vectors


def embed_texts(embedder: Embedder, texts: Sequence[str]) -> list[KeyVectors | VectorStoreError]:
    """The vectors of each text, split into chunks the model takes, or the error that stands for it.

    Every chunk of every text goes in one call (the embedder splits it at the request limits). A
    refusal about the input is narrowed down by halves to the texts that caused it.
    """
    pieces = [_split(embedder, text) for text in texts]
    made = iter(_embedded(embedder, [chunks for chunks in pieces if isinstance(chunks, list)]))
    return [next(made) if isinstance(chunks, list) else chunks for chunks in pieces]


def _split(embedder: Embedder, text: str) -> list[Chunk] | VectorStoreError:
    """The chunks of a text, or the error that stands for it (a tokenizer missing; a text no chunk holds)."""
    try:
        return embedder.chunker.split(text)
    except VectorStoreError as error:
        return error
    except ValueError as error:
        return EmbeddingRejected(f"the text cannot be embedded: {error}")


def _embedded(embedder: Embedder, pieces: list[list[Chunk]]) -> list[KeyVectors | VectorStoreError]:
    if not pieces:
        return []
    try:
        rows = embedder.embed([chunk.text for chunks in pieces for chunk in chunks])
    except EmbeddingRejected as error:
        if len(pieces) == 1 or not error.about_the_input:
            return [error] * len(pieces)
        half = len(pieces) // 2
        return _embedded(embedder, pieces[:half]) + _embedded(embedder, pieces[half:])
    except VectorStoreError as error:
        return [error] * len(pieces)
    ends = np.cumsum([len(chunks) for chunks in pieces])
    return [
        KeyVectors(chunks, rows[end - len(chunks) : end]) for chunks, end in zip(pieces, ends, strict=True)
    ]


def entries_for(record: Record, vectors: KeyVectors, stored: IndexEntry | None = None) -> list[IndexEntry]:
    """The index entries of a record's vectors, one per chunk; `stored`: what the index held before."""
    count = len(vectors.chunks)
    spans = [(chunk.start, chunk.end) if count > 1 else None for chunk in vectors.chunks]
    return _entries(record, count, spans, stored)


def relabelled(record: Record, stored: IndexEntry) -> list[IndexEntry]:
    """New labels for every chunk of a key whose text is unchanged: its version and its metadata.

    The chunks keep their offsets (Chroma keeps the fields an update leaves out).
    """
    return _entries(record, stored.chunks, [None] * stored.chunks, stored)


def _entries(
    record: Record, count: int, spans: list[tuple[int, int] | None], stored: IndexEntry | None
) -> list[IndexEntry]:
    metadata = record.metadata
    cleared = tuple(sorted(set(stored.metadata) - set(metadata))) if stored is not None else ()
    return [
        IndexEntry(
            record.namespace,
            record.key,
            record.version,
            record.content_hash,
            chunk=n,
            chunks=count,
            span=span,
            metadata=metadata,
            cleared=cleared,
        )
        for n, span in enumerate(spans)
    ]
