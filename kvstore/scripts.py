"""The Lua scripts beside this module, run by SHA inside pipelines.

redis-py's pipelines check every registered script with SCRIPT EXISTS before each run, an extra
round trip per batch; here a script is loaded once per client and loaded again only when Redis
answers NOSCRIPT (after a restart or SCRIPT FLUSH).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
from redis.exceptions import NoScriptError

__all__ = ["Script", "run_pipelined"]

Call = tuple["Script", Sequence[str], Sequence[str | int]]


class Script:
    """One Lua file of this package, known by its SHA1."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = resources.files("kvstore").joinpath(name).read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()


def run_pipelined(client: redis.Redis, calls: Sequence[Call]) -> list[Any]:
    """Run each (script, keys, args) in one round trip; the replies in order.

    A call Redis answered NOSCRIPT never ran, so it is run again once its script is loaded. Any
    other error of a call is raised.
    """
    replies = _execute(client, calls)
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        for script in {calls[i][0].sha: calls[i][0] for i in missing}.values():
            client.script_load(script.source)
        for i, reply in zip(missing, _execute(client, [calls[i] for i in missing]), strict=True):
            replies[i] = reply
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _execute(client: redis.Redis, calls: Sequence[Call]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for script, keys, args in calls:
        pipe.evalsha(script.sha, len(keys), *keys, *args)
    return list(pipe.execute(raise_on_error=False))
