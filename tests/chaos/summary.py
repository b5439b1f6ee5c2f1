"""Collects one line per chaos scenario and prints the table at the end of `make chaos`."""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass
class Scenario:
    name: str
    injected: str
    counted: str
    passed: bool = False


RESULTS: list[Scenario] = []


def record(name: str, injected: str) -> Scenario:
    scenario = Scenario(name, injected, "")
    RESULTS.append(scenario)
    return scenario


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    terminalreporter.section("chaos summary")
    terminalreporter.write_line("| scenario | injected | counted | result |")
    terminalreporter.write_line("|---|---|---|---|")
    for scenario in RESULTS:
        verdict = "pass" if scenario.passed else "FAIL"
        terminalreporter.write_line(
            f"| {scenario.name} | {scenario.injected} | {scenario.counted} | {verdict} |"
        )
