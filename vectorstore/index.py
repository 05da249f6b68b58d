"""VectorIndex: the Chroma side of memsync, a fixed set of shard collections per (model, dimensions).

A namespace is hashed to one of `shards` collections and stored as a metadata field that every
scoped query filters on. A collection per namespace cost about 2.6 MB of Chroma's memory per
namespace (1,000 namespaces of 10 memories: 2.7 GB), and one shared collection makes a filtered
query pay for every vector in it; shards bound both (see BENCHMARKS.md for the measurements).
The vectors of a key are a notion of their own (`vector_ids`): one per chunk of its text, chunk 0
first, each labelled with the key's version, content hash, chunk number and count, the chunk's
offsets in the text when there are several, and the version's metadata (`m.<name>`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import re
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import chromadb
import httpx
import numpy as np
import numpy.typing as npt
from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection
from chromadb.errors import ChromaError, NotFoundError

from kvstore import KeyRef, Scalar
from kvstore.filters import renamed
from vectorstore.errors import IndexUnavailable

__all__ = [
    "DEFAULT_SHARDS",
    "USER_FIELD_PREFIX",
    "IndexEntry",
    "VectorIndex",
    "Vectors",
    "chroma_answers",
    "chroma_client",
    "collection_name",
    "shard_for",
    "shard_name",
    "translated",
    "user_field",
    "vector_id",
    "vector_ids",
]

T = TypeVar("T")
#: Vectors as one float32 row each, as they come from the embedders and go to Chroma.
Vectors = npt.NDArray[np.float32]
#: Shard collections per (model, dimensions) unless told otherwise.
DEFAULT_SHARDS = 16
_SAFE_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PAGE = 1000
#: The most floats one upsert request carries: `chroma run` answered 413 to 5,000 vectors of 1,536.
MAX_FLOATS_PER_REQUEST = 2_000_000
#: How long a shard's vector count (`VectorIndex.share`) is taken as still true.
SHARE_CHECK_S = 10.0
#: What a user's metadata field is called in Chroma: beside memsync's own fields, never among them.
USER_FIELD_PREFIX = "m."


@dataclass(frozen=True)
class IndexEntry:
    """One vector of a key: the version and content hash it was made from, and which chunk it is.

    `span`: the chunk's character offsets in the text when the text has several chunks, else None.
    `cleared`: user fields the vector had and must lose (Chroma merges metadata on update); only written.
    """

    namespace: str
    key: str
    version: int
    content_hash: str
    distance: float = 0.0
    chunk: int = 0
    chunks: int = 1
    span: tuple[int, int] | None = None
    metadata: Mapping[str, Scalar] = field(default_factory=dict, hash=False)
    cleared: tuple[str, ...] = field(default=(), compare=False)

    @property
    def ref(self) -> KeyRef:
        return KeyRef(self.namespace, self.key)

    @property
    def id(self) -> str:
        return vector_id(self.ref, self.chunk)


def vector_id(ref: KeyRef, chunk: int = 0) -> str:
    """The id of one vector of a key; namespaces hold no ':', so an id names one key only."""
    return f"{ref.namespace}:{ref.key}#{chunk}"


def vector_ids(ref: KeyRef, chunks: int = 1, first: int = 0) -> list[str]:
    """The ids of chunks `first` to `chunks - 1` of a key."""
    return [vector_id(ref, chunk) for chunk in range(first, chunks)]


def user_field(name: str) -> str:
    """The name a user's metadata field has in Chroma."""
    return USER_FIELD_PREFIX + name


def collection_name(prefix: str, model: str, dimensions: int | None, namespace: str) -> str:
    """The name of a namespace's own collection in the layout before shards (see `vectorstore.migrate`)."""
    ns_part = namespace if _SAFE_NAMESPACE.fullmatch(namespace) else _digest(namespace)
    return f"{_stem(prefix, model, dimensions)}{ns_part}"


def shard_name(prefix: str, model: str, dimensions: int | None, shard: int, shards: int) -> str:
    """The name of one shard collection; the shard count is part of it, so layouts never mix."""
    return f"{_stem(prefix, model, dimensions)}shard{shard:04d}-of-{shards:04d}"


def shard_for(namespace: str, shards: int) -> int:
    """The shard of a namespace: the first 8 bytes of its sha256, mod `shards`."""
    digest = hashlib.sha256(namespace.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards


def _stem(prefix: str, model: str, dimensions: int | None) -> str:
    model_part = re.sub(r"[^A-Za-z0-9_-]+", "-", model).strip("-_")[:80] or "model"
    return f"{prefix}.{model_part}.{dimensions or 'native'}."


def chroma_client(url: str | None, path: str | None = None) -> ClientAPI:
    """A client of the Chroma server at `url`, or an embedded one under `path` (one process only)."""
    if url is None:
        return chromadb.PersistentClient(path=path or ".memsync/chroma")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise IndexUnavailable("CHROMA_URL must look like http://host:port")
    ssl = parts.scheme == "https"
    try:
        with translated():
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


@dataclass
class _Upsert:
    """One caller's upsert, waiting for its turn or for another thread to write it with its own."""

    entries: list[IndexEntry]
    rows: Vectors
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class VectorIndex:
    """Upserts, deletes and queries the vectors of keys, each with metadata key, namespace, version, hash.

    Every call that takes several keys makes one Chroma request per shard they fall in. Writes from
    one process go to Chroma one at a time: measured on `chroma run` (`bench/bench_costs.py`), 160
    upserts of 10 vectors took 7.9 ms of server CPU each from one writer and 14.6 to 20.2 ms from 2 to
    16 writers at once, and longer in all; queries are not held back. Upserts that wait meanwhile are written
    together, one request per shard, by the next thread to get its turn.
    """

    def __init__(
        self,
        client: ClientAPI,
        *,
        model: str,
        dimensions: int | None,
        prefix: str = "memsync",
        shards: int = DEFAULT_SHARDS,
    ) -> None:
        self.client = client
        self.model = model
        self.dimensions = dimensions
        self.prefix = prefix
        self.shards = shards
        self._collections: dict[int, Collection] = {}
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Upsert] = []
        self._batch_limit: int | None = None
        self._counts: dict[int, tuple[float, int]] = {}  # shard -> (when read, monotonic s; vectors)

    def shard_of(self, namespace: str) -> int:
        return shard_for(namespace, self.shards)

    def stored(self, refs: Sequence[KeyRef]) -> dict[KeyRef, IndexEntry]:
        """The first vector's entry of each key that has one (its `chunks` tells how many it has)."""
        found: dict[KeyRef, IndexEntry] = {}
        for shard, group in self._by_shard(refs).items():
            ids = [vector_id(ref) for ref in group]
            answer = self._call(shard, functools.partial(_get, ids=ids))
            found.update((e.ref, e) for e in map(_entry, answer["metadatas"] or []))
        return found

    def upsert(
        self, entries: Sequence[IndexEntry], vectors: Vectors | Sequence[Vectors] | Sequence[Sequence[float]]
    ) -> None:
        """Store one vector per entry (row `i` of `vectors` for entry `i`), replacing what those ids had.

        A key's chunks past the new ones are not touched: `delete_ids` removes them.
        """
        if not entries:
            return
        mine = _Upsert(list(entries), np.asarray(vectors, dtype=np.float32))
        with self._queue_lock:
            self._queue.append(mine)
        with self._writing:
            if not mine.done.is_set():
                self._write_queued()
        if mine.error is not None:  # shared by every upsert in the request: each raises a copy
            raise copy.copy(mine.error) from mine.error

    def _write_queued(self) -> None:
        """Write every queued upsert in one request per shard (a group commit); the caller holds `_writing`.

        Threads that queued while another wrote find their upsert done when they get the lock.
        """
        with self._queue_lock:
            queued, self._queue = self._queue, []
        entries = [entry for upsert in queued for entry in upsert.entries]
        rows = np.concatenate([upsert.rows for upsert in queued])
        error: Exception | None = None
        try:
            self._upsert_rows(entries, rows)
        except Exception as failure:  # every queued upsert shares the request, and so its failure
            error = failure
        for upsert in queued:
            upsert.error = error
            upsert.done.set()

    def _upsert_rows(self, entries: Sequence[IndexEntry], rows: Vectors) -> None:
        last = {entry.id: i for i, entry in enumerate(entries)}  # one id once: the last wins
        for shard, positions in self._positions_by_shard([e.ref for e in entries]).items():
            kept = [i for i in positions if last[entries[i].id] == i]
            for part in self._requests(kept, MAX_FLOATS_PER_REQUEST // max(1, rows.shape[1])):
                ids = [entries[i].id for i in part]
                metadatas: list[Any] = [_metadata(entries[i]) for i in part]
                batch: Any = rows[part]
                self._call(shard, functools.partial(_upsert, ids=ids, embeddings=batch, metadatas=metadatas))

    def _requests(self, positions: list[int], most: int | None = None) -> list[list[int]]:
        """Positions in groups that one Chroma request takes (its `max_batch_size`, and at most `most`)."""
        size = max(1, min(self._max_batch(), most or self._max_batch()))
        return [positions[start : start + size] for start in range(0, len(positions), size)]

    def _max_batch(self) -> int:
        if self._batch_limit is None:
            with translated():
                self._batch_limit = max(1, int(self.client.get_max_batch_size()))
        return self._batch_limit

    def relabel(self, entries: Sequence[IndexEntry]) -> None:
        """Update the labels (version, metadata) of vectors whose text did not change, without embedding."""
        with self._writing:
            self._relabel(entries)

    def _relabel(self, entries: Sequence[IndexEntry]) -> None:
        for shard, positions in self._positions_by_shard([e.ref for e in entries]).items():
            for part in self._requests(positions):
                ids = [entries[i].id for i in part]
                metadatas: list[Any] = [_metadata(entries[i]) for i in part]
                self._call(shard, functools.partial(_update, ids=ids, metadatas=metadatas))

    def delete(self, refs: Sequence[KeyRef]) -> None:
        """Remove every vector of the keys (every chunk); keys with none are ignored."""
        with self._writing:
            for shard, group in self._by_shard(refs).items():
                for part in self._requests(list(range(len(group)))):
                    scope = _keys_scope([group[i] for i in part])
                    self._call(shard, functools.partial(_delete_where, where=scope))

    def delete_ids(self, ids: Mapping[KeyRef, Sequence[str]]) -> None:
        """Remove the given vectors (by id) of each key: chunks a shorter text no longer has, say."""
        with self._writing:
            for shard, group in self._by_shard(list(ids)).items():
                wanted = [vid for ref in group for vid in ids[ref]]
                for part in self._requests(list(range(len(wanted)))):
                    self._call(shard, functools.partial(_delete, ids=[wanted[i] for i in part]))

    def query(
        self,
        namespace: str,
        vector: Sequence[float] | Vectors,
        n: int,
        where: Mapping[str, Any] | None = None,
    ) -> list[IndexEntry]:
        """The `n` vectors of a namespace nearest to `vector`, nearest first; distance is cosine distance.

        `where` is a checked filter on the user's metadata (`kvstore.filters.check_where`), by its names.
        """
        scoped: Any = {"namespace": namespace}
        if where:
            scoped = {"$and": [scoped, renamed(where, user_field)]}
        return self._query(self.shard_of(namespace), vector, n, scoped)

    def nearest(self, namespace: str, vector: Sequence[float] | Vectors, n: int) -> list[IndexEntry]:
        """The `n` vectors nearest to `vector` in the namespace's shard, of any namespace, unfiltered."""
        return self._query(self.shard_of(namespace), vector, n, None)

    def share(self, namespace: str, vectors: int) -> float:
        """What share of its shard's vectors a namespace of about `vectors` vectors holds (0 to 1).

        The shard's count is read at most once every `SHARE_CHECK_S` per process.
        """
        shard = self.shard_of(namespace)
        now = time.monotonic()
        seen = self._counts.get(shard)
        if seen is None or now - seen[0] > SHARE_CHECK_S:
            seen = (now, self._call(shard, lambda c: c.count()))
            self._counts[shard] = seen
        return min(1.0, vectors / seen[1]) if seen[1] else 0.0

    def _query(self, shard: int, vector: Sequence[float] | Vectors, n: int, where: Any) -> list[IndexEntry]:
        embedding: Any = np.asarray([vector], dtype=np.float32)

        def run(c: Collection) -> Any:
            include: Any = ["metadatas", "distances"]
            return c.query(query_embeddings=embedding, n_results=n, where=where, include=include)

        answer = self._call(shard, run)
        metadatas, distances = answer["metadatas"][0], answer["distances"][0]
        return [_entry(meta, distance) for meta, distance in zip(metadatas, distances, strict=True)]

    def entries(self, namespace: str) -> Iterator[IndexEntry]:
        """Every entry of a namespace, page by page."""
        return self._pages(self.shard_of(namespace), {"namespace": namespace})

    def all_entries(self) -> Iterator[IndexEntry]:
        """Every entry of every namespace, shard by shard (for reconcile and reindex)."""
        for shard in self._existing_shards():
            yield from self._pages(shard, None)

    def namespaces(self) -> list[str]:
        """The namespaces that have at least one vector."""
        return sorted({entry.namespace for entry in self.all_entries()})

    def vector_counts(self) -> dict[str, int]:
        """How many vectors each shard collection holds, by name; a shard never written is left out."""
        names = {self._name(shard) for shard in range(self.shards)}
        with translated():
            return {c.name: c.count() for c in self.client.list_collections() if c.name in names}

    def drop(self, namespace: str) -> None:
        """Delete every vector of a namespace (used to rebuild the index from Redis)."""
        self._call(self.shard_of(namespace), lambda c: c.delete(where={"namespace": namespace}))

    def drop_all(self) -> None:
        """Delete every shard collection of this model, dimensions and shard count."""
        for shard in range(self.shards):
            with translated(), self._lock, suppress(NotFoundError, ValueError):
                self._collections.pop(shard, None)
                self.client.delete_collection(self._name(shard))

    def _pages(self, shard: int, where: dict[str, Any] | None) -> Iterator[IndexEntry]:
        for offset in itertools.count(0, _PAGE):
            page = self._call(shard, functools.partial(_page, offset=offset, where=where))
            metadatas = page["metadatas"] or []
            yield from map(_entry, metadatas)
            if len(metadatas) < _PAGE:
                return

    def _existing_shards(self) -> list[int]:
        names = {self._name(shard): shard for shard in range(self.shards)}
        with translated():
            collections = self.client.list_collections()
        return sorted(names[c.name] for c in collections if c.name in names)

    def _by_shard(self, refs: Sequence[KeyRef]) -> dict[int, list[KeyRef]]:
        groups: dict[int, list[KeyRef]] = defaultdict(list)
        for ref in dict.fromkeys(refs):
            groups[self.shard_of(ref.namespace)].append(ref)
        return groups

    def _positions_by_shard(self, refs: Sequence[KeyRef]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = defaultdict(list)
        for position, ref in enumerate(refs):
            groups[self.shard_of(ref.namespace)].append(position)
        return groups

    def _call(self, shard: int, operation: Callable[[Collection], T]) -> T:
        with translated():
            try:
                return operation(self._collection(shard))
            except NotFoundError:
                self._forget(shard)  # deleted behind our back: make it again, once
                return operation(self._collection(shard))

    def _collection(self, shard: int) -> Collection:
        with self._lock:
            if shard not in self._collections:
                self._collections[shard] = self._open(shard)
            return self._collections[shard]

    def _name(self, shard: int) -> str:
        return shard_name(self.prefix, self.model, self.dimensions, shard, self.shards)

    def _open(self, shard: int) -> Collection:
        metadata: Any = {
            "shard": shard,
            "shards": self.shards,
            "model": self.model,
            "dimensions": self.dimensions or 0,
        }
        return self.client.get_or_create_collection(
            name=self._name(shard),
            metadata=metadata,
            configuration={"hnsw": {"space": "cosine"}},
            embedding_function=None,
        )

    def _forget(self, shard: int) -> None:
        with self._lock:
            self._collections.pop(shard, None)


def _get(collection: Collection, *, ids: list[str]) -> Any:
    return collection.get(ids=ids, include=["metadatas"])


def _upsert(collection: Collection, *, ids: list[str], embeddings: Any, metadatas: Any) -> None:
    collection.upsert(ids=ids, embeddings=embeddings, metadatas=metadatas)


def _update(collection: Collection, *, ids: list[str], metadatas: Any) -> None:
    collection.update(ids=ids, metadatas=metadatas)


def _delete(collection: Collection, *, ids: list[str]) -> None:
    collection.delete(ids=ids)


def _delete_where(collection: Collection, *, where: Any) -> None:
    collection.delete(where=where)


def _keys_scope(refs: Sequence[KeyRef]) -> dict[str, Any]:
    """A filter on every vector of these keys (of one shard), whatever their chunk count."""
    by_namespace: dict[str, list[str]] = defaultdict(list)
    for ref in refs:
        by_namespace[ref.namespace].append(ref.key)
    terms = [{"$and": [{"namespace": ns}, {"key": {"$in": keys}}]} for ns, keys in by_namespace.items()]
    return terms[0] if len(terms) == 1 else {"$or": terms}


def _page(collection: Collection, *, offset: int, where: dict[str, Any] | None) -> Any:
    scope: Any = where
    return collection.get(include=["metadatas"], where=scope, limit=_PAGE, offset=offset)


def _metadata(entry: IndexEntry) -> dict[str, Scalar | None]:
    own: dict[str, Scalar | None] = {
        "key": entry.key,
        "namespace": entry.namespace,
        "version": entry.version,
        "hash": entry.content_hash,
        "chunk": entry.chunk,
        "chunks": entry.chunks,
    }
    if entry.span is not None:
        own["start"], own["end"] = entry.span
    elif entry.chunks == 1:  # Chroma merges metadata: a text that was several chunks loses its offsets
        own["start"] = own["end"] = None
    own.update((user_field(name), None) for name in entry.cleared)
    own.update((user_field(name), value) for name, value in entry.metadata.items())
    return own


def _entry(metadata: Any, distance: float = 0.0) -> IndexEntry:
    chunks = int(metadata.get("chunks", 1))
    span = (int(metadata["start"]), int(metadata["end"])) if "start" in metadata else None
    mine = {
        name[len(USER_FIELD_PREFIX) :]: value
        for name, value in metadata.items()
        if name.startswith(USER_FIELD_PREFIX)
    }
    return IndexEntry(
        str(metadata["namespace"]),
        str(metadata["key"]),
        int(metadata["version"]),
        str(metadata["hash"]),
        float(distance),
        int(metadata.get("chunk", 0)),
        chunks,
        span,
        mine,
    )


def _digest(text: str) -> str:
    return "h" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


@contextmanager
def translated() -> Iterator[None]:
    """Turn Chroma's and httpx's failures into IndexUnavailable (a missing collection is left as is)."""
    try:
        yield
    except NotFoundError:
        raise
    except (httpx.HTTPError, ChromaError, ConnectionError, OSError) as err:
        raise IndexUnavailable(f"Chroma failed: {type(err).__name__}: {str(err)[:200]}") from err
