"""VectorIndex: the Chroma side of memsync, one collection per (model, dimensions, namespace).

A collection per namespace keeps namespace-scoped search off Chroma's metadata-filter path, which
measured about 17 times slower than a plain query at 100,000 vectors. The vectors of a key are a
notion of their own (`vector_ids`): today one vector, chunk 0; long texts may get several.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import threading
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import chromadb
import httpx
from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection
from chromadb.errors import ChromaError, NotFoundError

from vectorstore.errors import IndexUnavailable

__all__ = ["IndexEntry", "VectorIndex", "chroma_answers", "chroma_client", "collection_name", "vector_ids"]

T = TypeVar("T")
_SAFE_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PAGE = 1000


@dataclass(frozen=True)
class IndexEntry:
    """What the index holds for one key: the version and content hash its vector was made from."""

    key: str
    version: int
    content_hash: str
    distance: float = 0.0


def vector_ids(key: str, chunks: int = 1) -> list[str]:
    """The ids of a key's vectors."""
    return [f"{key}#{chunk}" for chunk in range(chunks)]


def collection_name(prefix: str, model: str, dimensions: int | None, namespace: str) -> str:
    """A Chroma collection name unique to the model, its dimensions and the namespace."""
    model_part = re.sub(r"[^A-Za-z0-9_-]+", "-", model).strip("-_")[:80] or "model"
    ns_part = namespace if _SAFE_NAMESPACE.fullmatch(namespace) else _digest(namespace)
    return f"{prefix}.{model_part}.{dimensions or 'native'}.{ns_part}"


def chroma_client(url: str | None, path: str | None = None) -> ClientAPI:
    """A client of the Chroma server at `url`, or an embedded one under `path` (one process only)."""
    if url is None:
        return chromadb.PersistentClient(path=path or ".memsync/chroma")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise IndexUnavailable("CHROMA_URL must look like http://host:port")
    ssl = parts.scheme == "https"
    try:
        with _translated():
            return chromadb.HttpClient(
                host=parts.hostname, port=parts.port or (443 if ssl else 8000), ssl=ssl
            )
    except ValueError as err:  # what chromadb raises when no server answers
        raise IndexUnavailable(f"Chroma failed: {err}") from err


def chroma_answers(url: str) -> bool:
    """Whether a Chroma server answers its heartbeat at `url` within a second."""
    try:
        with urllib.request.urlopen(f"{url}/api/v2/heartbeat", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


class VectorIndex:
    """Upserts, deletes and queries the vectors of keys, each with metadata key, namespace, version, hash."""

    def __init__(
        self, client: ClientAPI, *, model: str, dimensions: int | None, prefix: str = "memsync"
    ) -> None:
        self.client = client
        self.model = model
        self.dimensions = dimensions
        self.prefix = prefix
        self._collections: dict[str, Collection] = {}
        self._lock = threading.Lock()

    def stored(self, namespace: str, keys: Sequence[str]) -> dict[str, IndexEntry]:
        """The index entries of `keys` that have a vector, by key."""
        ids = [vector_ids(key)[0] for key in keys]
        answer = self._call(namespace, lambda c: c.get(ids=ids, include=["metadatas"]))
        return {entry.key: entry for entry in map(_entry, answer["metadatas"] or [])}

    def upsert(
        self, namespace: str, entries: Sequence[IndexEntry], vectors: Sequence[Sequence[float]]
    ) -> None:
        """Store one vector per entry, replacing what the keys had."""
        if not entries:
            return
        ids = [vector_ids(entry.key)[0] for entry in entries]
        metadatas: list[Any] = [_metadata(namespace, entry) for entry in entries]
        embeddings: list[Any] = [list(vector) for vector in vectors]
        self._call(namespace, lambda c: c.upsert(ids=ids, embeddings=embeddings, metadatas=metadatas))

    def relabel(self, namespace: str, entries: Sequence[IndexEntry]) -> None:
        """Update the version of vectors whose text did not change, without embedding again."""
        if not entries:
            return
        ids = [vector_ids(entry.key)[0] for entry in entries]
        metadatas: list[Any] = [_metadata(namespace, entry) for entry in entries]
        self._call(namespace, lambda c: c.update(ids=ids, metadatas=metadatas))

    def delete(self, namespace: str, keys: Sequence[str]) -> None:
        """Remove every vector of `keys`; keys with none are ignored."""
        if keys:
            ids = [vid for key in keys for vid in vector_ids(key)]
            self._call(namespace, lambda c: c.delete(ids=ids))

    def query(
        self, namespace: str, vector: Sequence[float], n: int, where: dict[str, Any] | None = None
    ) -> list[IndexEntry]:
        """The `n` entries nearest to `vector`, nearest first; distance is cosine distance."""
        embedding: Any = [list(vector)]

        def run(c: Collection) -> Any:
            return c.query(
                query_embeddings=embedding, n_results=n, where=where, include=["metadatas", "distances"]
            )

        answer = self._call(namespace, run)
        metadatas, distances = answer["metadatas"][0], answer["distances"][0]
        return [_entry(meta, distance) for meta, distance in zip(metadatas, distances, strict=True)]

    def count(self, namespace: str) -> int:
        return int(self._call(namespace, lambda c: c.count()))

    def entries(self, namespace: str) -> Iterator[IndexEntry]:
        """Every entry of a namespace, page by page."""
        for offset in itertools.count(0, _PAGE):
            page = self._call(namespace, functools.partial(_page, offset=offset))
            metadatas = page["metadatas"] or []
            yield from map(_entry, metadatas)
            if len(metadatas) < _PAGE:
                return

    def namespaces(self) -> list[str]:
        """The namespaces that have a collection for this model and these dimensions."""
        stem = collection_name(self.prefix, self.model, self.dimensions, "x")[:-1]
        with _translated():
            collections = self.client.list_collections()
        return sorted(
            str((c.metadata or {}).get("namespace")) for c in collections if c.name.startswith(stem)
        )

    def drop(self, namespace: str) -> None:
        """Delete a namespace's collection (used to rebuild the index from Redis)."""
        with _translated(), self._lock:
            self._collections.pop(namespace, None)
            with suppress(NotFoundError):
                self.client.delete_collection(
                    collection_name(self.prefix, self.model, self.dimensions, namespace)
                )

    def _call(self, namespace: str, operation: Callable[[Collection], T]) -> T:
        with _translated():
            try:
                return operation(self._collection(namespace))
            except NotFoundError:
                self._forget(namespace)  # deleted behind our back: make it again, once
                return operation(self._collection(namespace))

    def _collection(self, namespace: str) -> Collection:
        with self._lock:
            if namespace not in self._collections:
                self._collections[namespace] = self._open(namespace)
            return self._collections[namespace]

    def _open(self, namespace: str) -> Collection:
        name = collection_name(self.prefix, self.model, self.dimensions, namespace)
        metadata: Any = {"namespace": namespace, "model": self.model, "dimensions": self.dimensions or 0}
        return self.client.get_or_create_collection(
            name=name,
            metadata=metadata,
            configuration={"hnsw": {"space": "cosine"}},
            embedding_function=None,
        )

    def _forget(self, namespace: str) -> None:
        with self._lock:
            self._collections.pop(namespace, None)


def _page(collection: Collection, *, offset: int) -> Any:
    return collection.get(include=["metadatas"], limit=_PAGE, offset=offset)


def _metadata(namespace: str, entry: IndexEntry) -> dict[str, str | int]:
    return {"key": entry.key, "namespace": namespace, "version": entry.version, "hash": entry.content_hash}


def _entry(metadata: Any, distance: float = 0.0) -> IndexEntry:
    return IndexEntry(str(metadata["key"]), int(metadata["version"]), str(metadata["hash"]), float(distance))


def _digest(text: str) -> str:
    return "h" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except NotFoundError:
        raise
    except (httpx.HTTPError, ChromaError, ConnectionError, OSError) as err:
        raise IndexUnavailable(f"Chroma failed: {type(err).__name__}: {str(err)[:200]}") from err
