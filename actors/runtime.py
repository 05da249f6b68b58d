"""The services of one process (store, index, embedder), built from the settings once, on first use."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import redis

from actors.brokers import retry_policy
from actors.deadletter import DeadLetters
from actors.retry import RetryPolicy
from kvstore import Keys, MemoryStore
from settings import Settings

if TYPE_CHECKING:  # imported where used: a command that reads only Redis pays for neither Chroma nor openai
    from actors.coalesce import Coalescer
    from vectorstore import Embedder, Memories
    from vectorstore.active import ActiveIndexes

__all__ = ["Runtime", "make_embedder"]


def make_embedder(settings: Settings) -> Embedder:
    """The OpenAI-compatible embedder when a key is set (or asked for), else the offline model."""
    from actors.indexes import embedder_for, own_spec

    return embedder_for(settings, own_spec(settings))


@dataclass
class Runtime:
    """Where this process's Redis and Chroma are, and the services over them."""

    settings: Settings
    redis_url: str
    chroma_url: str | None
    secrets: list[str]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, health_check_interval=30)

    @cached_property
    def keys(self) -> Keys:
        return Keys(self.settings.prefix)

    @cached_property
    def store(self) -> MemoryStore:
        s = self.settings
        return MemoryStore(
            self.redis, prefix=s.prefix, history_length=s.history_length, max_value_bytes=s.max_value_bytes
        )

    @cached_property
    def dead_letters(self) -> DeadLetters:
        return DeadLetters(self.redis, self.keys, secrets=self.secrets)

    @property
    def policy(self) -> RetryPolicy:
        return retry_policy(self.settings)

    @property
    def memories(self) -> Memories:
        """The active index's services (see `vectorstore.active`): they follow a `memsync reindex`."""
        return self.indexes.memories()

    @property
    def indexes(self) -> ActiveIndexes:
        """Built on first use (it connects to Chroma; an embedder may load a model), once per process."""
        with self._lock:
            return self._indexes

    @cached_property
    def _indexes(self) -> ActiveIndexes:
        from actors.indexes import active_indexes

        for name in ("httpx", "httpx2"):  # one INFO line per Chroma or embedding request otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
        return active_indexes(self.settings, self.store, self.chroma_url)

    @cached_property
    def coalescer(self) -> Coalescer:
        """Shares batches between the concurrent single syncs of this process's worker threads."""
        from actors.coalesce import Coalescer

        s = self.settings
        return Coalescer(
            lambda items: self.memories.sync_many(items), window_ms=s.coalesce_ms, max_items=s.coalesce_max
        )
