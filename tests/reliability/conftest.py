"""The reliability suite: real processes, faults injected, every invariant checked at the end.

Each scenario adds a row to the table printed at the end of the run (and copied into
RELIABILITY.md): the scenario, its size, what was checked, and the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

__all__ = ["Report", "reliability_report"]


@dataclass
class Row:
    scenario: str
    size: str
    checked: str
    result: str = "failed"


_rows: list[Row] = []

Report = Callable[[str, str, str], None]


@pytest.fixture
def reliability_report(request: pytest.FixtureRequest) -> Iterator[Report]:
    """Call `reliability_report(scenario, size, checked)`; the row says passed only if the test passed."""
    rows: list[Row] = []

    def report(scenario: str, size: str, checked: str) -> None:
        rows.append(Row(scenario, size, checked))

    yield report
    passed = not getattr(request.node, "_failed", False)
    for row in rows:
        row.result = "passed" if passed else "failed"
    _rows.extend(rows)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if getattr(report, "failed", False):
        item._failed = True  # type: ignore[attr-defined]
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _rows:
        return
    terminalreporter.section("reliability")
    terminalreporter.write_line("| scenario | size | checked | result |")
    terminalreporter.write_line("| --- | --- | --- | --- |")
    for row in _rows:
        terminalreporter.write_line(f"| {row.scenario} | {row.size} | {row.checked} | {row.result} |")
