"""`memsync demo`: the main job end to end on whatever the settings point at (the local stack by default)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from actors import state
from actors.local import local_stack
from actors.views import score_text
from settings import Settings

__all__ = ["run_demo"]

NAMESPACE = "demo-user-42"
MEMORIES = {
    "prefs:theme": "Prefers dark mode in every app, especially at night",
    "diet": "Vegetarian, and allergic to peanuts",
    "pet": "Has a golden retriever named Biscuit who loves the beach",
    "travel": "Planning a trip to Lisbon in May with two friends",
    "work": "Works as a data engineer on streaming pipelines",
}
QUESTION = "what theme does the user like?"
RESULT_TIMEOUT_MS = 180_000

Say = Callable[[str], Any]


def run_demo(settings: Settings, say: Say) -> int:
    """Start the stack and a worker, then sync, search, update, roll back, printing each step."""
    say("1. starting Redis, Chroma and a worker (first start loads the embedding model)")
    with local_stack(settings, worker=True) as stack:
        say(f"   REDIS_URL={stack.redis_url} CHROMA_URL={stack.chroma_url}; started: {stack.started}")
        _sync_all(say)
        _search(say, "3.")
        _wait(
            say,
            "4. update prefs:theme to light mode",
            _send_sync("prefs:theme", "Switched to light mode for reading"),
        )
        _search(say, "5.")
        _wait(say, "6. roll back prefs:theme", _send_rollback("prefs:theme"))
        value = state.runtime().store.get("prefs:theme", namespace=NAMESPACE)
        say(f"   prefs:theme is again {json.dumps(value)}")
        _search(say, "7.")
    say(f"done: the data stays in {settings.data_dir} (MEMSYNC_DATA_DIR). To look at it, run `memsync up`,")
    say(f"   then in another terminal `memsync get prefs:theme --namespace {NAMESPACE}`")
    return 0


def _sync_all(say: Say) -> None:
    say(f"2. memory_sync.send(..., embed=True) for {len(MEMORIES)} memories of {NAMESPACE}")
    messages = [_send_sync(key, value) for key, value in MEMORIES.items()]
    started = time.monotonic()
    for message in messages:
        result = message.get_result(block=True, timeout=RESULT_TIMEOUT_MS)
        say(f"   {json.dumps(result)}")
    say(f"   all applied in {time.monotonic() - started:.1f} s")


def _send_sync(key: str, value: str) -> Any:
    from actors.tasks import memory_sync

    return memory_sync.send(key=key, value=value, embed=True, namespace=NAMESPACE)


def _send_rollback(key: str) -> Any:
    from actors.tasks import memory_rollback

    return memory_rollback.send(key=key, namespace=NAMESPACE)


def _wait(say: Say, title: str, message: Any) -> None:
    say(title)
    say(f"   {json.dumps(message.get_result(block=True, timeout=RESULT_TIMEOUT_MS))}")


def _search(say: Say, step: str) -> None:
    say(f"{step} search({QUESTION!r}, k=3)")
    for hit in state.runtime().memories.search(QUESTION, k=3, namespace=NAMESPACE):
        say(f"   {score_text(hit.score)}  {hit.key} v{hit.version}: {json.dumps(hit.value)}")
