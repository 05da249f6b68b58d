"""Every entry point, run as a user runs it, with a bad setting: one line naming the variable, no trace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.worker import PROJECT_ROOT

BIN = Path(sys.executable).parent
BAD_SETTINGS = [
    ({"MEMSYNC_MAX_RETRIES": "abc"}, "MEMSYNC_MAX_RETRIES"),
    ({"REDIS_URL": "redis://:s3cret-pw@localhost:notaport/0"}, "REDIS_URL"),
]
ENTRY_POINTS = {
    "memsync": [str(BIN / "memsync"), "get", "some-key"],
    "python -m actors": [sys.executable, "-m", "actors"],
    "dramatiq actors": [str(BIN / "dramatiq"), "actors", "--processes", "1", "--threads", "1"],
}


def _run(command: list[str], overrides: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "WORKER_JOB": "MEMORY_SYNC",
        "WORKER_PAYLOAD": '{"key": "k", "value": 1}',
        **overrides,
    }
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(("overrides", "variable"), BAD_SETTINGS, ids=[v for _, v in BAD_SETTINGS])
def test_a_bad_setting_stops_every_entry_point_with_one_line_naming_it(
    entry: str, overrides: dict[str, str], variable: str
) -> None:
    ran = _run(ENTRY_POINTS[entry], overrides)
    assert ran.returncode != 0
    assert "Traceback" not in ran.stderr + ran.stdout
    ours = [line for line in ran.stderr.splitlines() if variable in line]
    assert len(ours) == 1, ran.stderr
    assert "s3cret-pw" not in ran.stderr + ran.stdout
    if entry != "dramatiq actors":  # Dramatiq's main process adds its own lines about the worker's exit
        assert ran.stderr.strip().splitlines() == ours


def test_help_reads_no_setting() -> None:
    ran = _run([str(BIN / "memsync"), "--help"], {"MEMSYNC_MAX_RETRIES": "abc"})
    assert ran.returncode == 0, ran.stderr
    assert "usage: memsync" in ran.stdout and ran.stderr == ""


def test_importing_the_errors_and_the_cli_reads_no_setting_and_loads_neither_chroma_nor_openai() -> None:
    probe = (
        "import sys, actors.errors, actors.cli;"
        "print(sorted(m for m in ('actors.tasks', 'chromadb', 'openai') if m in sys.modules))"
    )
    ran = _run([sys.executable, "-c", probe], {"MEMSYNC_MAX_RETRIES": "abc"})
    assert (ran.returncode, ran.stdout.strip(), ran.stderr) == (0, "[]", "")


def test_a_plain_one_off_sync_does_not_load_the_local_model(namespace: str, prefix: str) -> None:
    probe = (
        "import sys; from actors.oneoff import main; status = main();"
        "print(status, 'onnxruntime' in sys.modules, file=sys.stderr)"
    )
    payload = f'{{"key": "k", "value": 1, "namespace": "{namespace}"}}'
    own = {
        "MEMSYNC_PREFIX": prefix,
        "MEMSYNC_EMBEDDER": "local",
        "WORKER_PAYLOAD": payload,
    }  # a store of its own
    ran = _run([sys.executable, "-c", probe], own)
    assert ran.stderr.strip() == "0 False"
    assert '"status": "success"' in ran.stdout
