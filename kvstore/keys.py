"""Every Redis key shape memsync uses, under one prefix.

    {prefix}:head:{namespace}:{key}     hash   the current record of a key (or its tombstone)
    {prefix}:hist:{namespace}:{key}     list   earlier records, newest first, JSON, bounded
    {prefix}:keys:{namespace}           zset   the keys of a namespace that hold a value
    {prefix}:namespaces                 set    every namespace written to
    {prefix}:lock:{namespace}:{key}     string the short lock around a key's index update
    {prefix}:dead                       hash   dead-lettered message id -> JSON reason record
    {prefix}-dramatiq:*                        Dramatiq's own queues (broker namespace); of those,
    {prefix}-dramatiq:{queue}.XQ        zset   Dramatiq's dead-letter queue (redis message ids)
    {prefix}-dramatiq:__heartbeats__    zset   Dramatiq's worker heartbeats (broker id -> ms)
    {prefix}-results:*                         Dramatiq's stored results

Namespaces cannot contain ':', so every shape above parses one way only.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keys"]


@dataclass(frozen=True)
class Keys:
    """Builds the Redis keys of one memsync installation."""

    prefix: str = "memsync"

    def head(self, namespace: str, key: str) -> str:
        return f"{self.prefix}:head:{namespace}:{key}"

    def history(self, namespace: str, key: str) -> str:
        return f"{self.prefix}:hist:{namespace}:{key}"

    def key_index(self, namespace: str) -> str:
        return f"{self.prefix}:keys:{namespace}"

    def namespaces(self) -> str:
        return f"{self.prefix}:namespaces"

    def lock(self, namespace: str, key: str) -> str:
        return f"{self.prefix}:lock:{namespace}:{key}"

    def dead_letters(self) -> str:
        return f"{self.prefix}:dead"

    def broker_namespace(self) -> str:
        return f"{self.prefix}-dramatiq"

    def dramatiq_dead_queue(self, queue: str) -> str:
        return f"{self.broker_namespace()}:{queue}.XQ"

    def dramatiq_heartbeats(self) -> str:
        return f"{self.broker_namespace()}:__heartbeats__"

    def results_namespace(self) -> str:
        return f"{self.prefix}-results"
