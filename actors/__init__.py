"""actors: the Dramatiq wiring of memsync. Importing it builds the broker from the settings.

Apps send with `memory_sync.send(key=..., value=..., embed=True)` and query with `search(...)`;
workers run `dramatiq actors`.
"""

from __future__ import annotations

from typing import Any

from actors import state

broker = state.configure()

from actors.tasks import memory_rollback, memory_sync, memory_sync_batch  # noqa: E402  (needs the broker above)
from vectorstore import Hit  # noqa: E402

__all__ = ["broker", "memory_rollback", "memory_sync", "memory_sync_batch", "search"]


def search(
    query: str, k: int = 5, namespace: str | None = None, where: dict[str, Any] | None = None
) -> list[Hit]:
    """The `k` current memories closest in meaning to `query` (higher score is closer)."""
    return state.runtime().memories.search(query, k, namespace, where)
