"""Every Redis key shape memsync uses, under one prefix.

    {prefix}:head:{namespace}:{key}     hash   the current record of a key (or its tombstone)
    {prefix}:hist:{namespace}:{key}     list   earlier records, newest first, JSON, bounded
    {prefix}:keys:{namespace}           zset   the keys of a namespace that hold a value
    {prefix}:namespaces                 set    every namespace written to
    {prefix}:lock:{namespace}:{key}     string the short lock around a key's index update
    {prefix}:dead                       hash   dead-lettered message id -> JSON reason record
    {prefix}:workers                    zset   worker process id -> its last heartbeat (ms), any broker
    {prefix}:index:active               string JSON {model, dimensions}: the index search() uses
    {prefix}:index:reindex              string JSON: a model migration under way (target, phase, checkpoint)
    {prefix}-dramatiq:*                        Dramatiq's Redis broker (its namespace; see BrokerKeys):
    {prefix}-dramatiq:{queue}           list   ids of messages ready to be fetched
    {prefix}-dramatiq:{queue}.msgs      hash   id -> message, for ready and fetched-not-acked ones
    {prefix}-dramatiq:{queue}.DQ        list   ids of delayed messages (retries) not yet fetched
    {prefix}-dramatiq:{queue}.DQ.msgs   hash   id -> message, for every delayed message
    {prefix}-dramatiq:{queue}.XQ        zset   Dramatiq's dead-letter queue (id -> when, ms)
    {prefix}-dramatiq:{queue}.XQ.msgs   hash   id -> dead-lettered message
    {prefix}-dramatiq:__acks__.{worker}.{queue}  set  ids a worker fetched and has not acked
    {prefix}-dramatiq:__heartbeats__    zset   Dramatiq's broker ids (apps' too) -> last command, ms
    {prefix}-results:*                         Dramatiq's stored results

Namespaces cannot contain ':', so every shape above parses one way only.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BrokerKeys", "Keys"]


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

    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def active_index(self) -> str:
        return f"{self.prefix}:index:active"

    def reindex(self) -> str:
        return f"{self.prefix}:index:reindex"

    def broker_namespace(self) -> str:
        return f"{self.prefix}-dramatiq"

    def broker_keys(self) -> BrokerKeys:
        return BrokerKeys(self.broker_namespace())

    def dramatiq_heartbeats(self) -> str:
        return self.broker_keys().heartbeats()

    def results_namespace(self) -> str:
        return f"{self.prefix}-results"


@dataclass(frozen=True)
class BrokerKeys:
    """The keys Dramatiq's Redis broker keeps under its namespace (dramatiq/brokers/redis/dispatch.lua).

    A delayed message lives in `{queue}.DQ`; a dead-lettered one, from either, in `{queue}.XQ`.
    """

    namespace: str

    def queue(self, queue: str) -> str:
        return f"{self.namespace}:{queue}"

    def queue_messages(self, queue: str) -> str:
        return f"{self.queue(queue)}.msgs"

    def delay_queue(self, queue: str) -> str:
        return f"{self.namespace}:{queue}.DQ"

    def delay_messages(self, queue: str) -> str:
        return f"{self.delay_queue(queue)}.msgs"

    def dead_queue(self, queue: str) -> str:
        return f"{self.namespace}:{queue}.XQ"

    def dead_messages(self, queue: str) -> str:
        return f"{self.dead_queue(queue)}.msgs"

    def acks_prefix(self) -> str:
        """What every `acks` key starts with; the worker id follows it, then `.` and the queue."""
        return f"{self.namespace}:__acks__."

    def acks(self, worker_id: str, queue: str) -> str:
        return f"{self.acks_prefix()}{worker_id}.{queue}"

    def heartbeats(self) -> str:
        return f"{self.namespace}:__heartbeats__"
