"""The ceiling of the sync benchmark: a no-op actor on memsync's queue, broker and middleware.

It stores its result, as `memory_sync` does, so the ratio compares like with like. Loaded by the
benchmark's worker (`dramatiq actors bench.ceiling`) and by the benchmark itself, to send to it.
"""

from __future__ import annotations

from typing import Any

import dramatiq

from actors import state


@dramatiq.actor(actor_name="bench_noop", queue_name=state.settings().queue, store_results=True)
def noop(key: str, value: Any, embed: bool = False) -> dict[str, Any]:
    """Do nothing, and answer as a sync does."""
    return {"status": "success", "key": key}
