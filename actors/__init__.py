"""actors: the Dramatiq wiring of memsync.

Apps send with `memory_sync.send(key=..., value=..., embed=True)`, query with `search(...)` and
browse with `memories(...)`;
workers run `dramatiq actors`. The broker is built from the settings on first use of `broker` or
of an actor, so importing a submodule (`actors.errors`) reads no setting; under Dramatiq's CLI it is
built at import, as Dramatiq expects, and a bad setting stops the worker with one line.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actors.tasks import memory_rollback, memory_sync, memory_sync_batch
    from kvstore.listing import Page
    from vectorstore import Hit

__all__ = ["broker", "memories", "memory_rollback", "memory_sync", "memory_sync_batch", "search"]

_ACTORS = frozenset({"memory_rollback", "memory_sync", "memory_sync_batch"})


def __getattr__(name: str) -> Any:
    if name == "broker":
        return _state().broker()
    if name in _ACTORS:
        _state().broker()  # builds the broker the actors are declared on
        # Not sys.modules: while another thread still imports actors.tasks, the import lock waits for it.
        return getattr(importlib.import_module("actors.tasks"), name)
    raise AttributeError(f"module 'actors' has no attribute {name!r}")


def search(
    query: str,
    k: int = 5,
    namespace: str | None = None,
    where: dict[str, Any] | None = None,
    *,
    min_score: float | None = None,
) -> list[Hit]:
    """The `k` current memories closest in meaning to `query` (higher score is closer).

    `where` filters on metadata (`{"kind": "fact"}`, `{"year": {"$gte": 2020}}`, `$and`, `$or`);
    `min_score` leaves out hits less similar than it.
    """
    hits: list[Hit] = _state().runtime().memories.search(query, k, namespace, where, min_score=min_score)
    return hits


def memories(
    namespace: str | None = None,
    where: dict[str, Any] | None = None,
    *,
    limit: int = 100,
    cursor: str | None = None,
) -> Page:
    """The current memories of a namespace whose metadata matches `where`, in key order, a page at a time.

    Pass the page's `cursor` to get the next one; it is None after the last.
    """
    from kvstore.listing import list_memories

    page: Page = list_memories(_state().runtime().store, namespace, where, limit=limit, cursor=cursor)
    return page


def _state() -> Any:
    # Not `from actors import state`: that looks the name up on this module, i.e. in __getattr__.
    return importlib.import_module("actors.state")


def _configure_for_dramatiq() -> None:
    """`dramatiq actors` takes the global broker once the module is imported: build it now."""
    from settings import SettingsError

    try:
        _state().broker()
    except SettingsError as error:
        raise SystemExit(f"memsync: {error}") from None


if "dramatiq.cli" in sys.modules:
    _configure_for_dramatiq()
