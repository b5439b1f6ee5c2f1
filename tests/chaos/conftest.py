"""Chaos scenarios (`make chaos`): real processes killed, a real database stopped and crashed."""

from __future__ import annotations

import pytest

from tests.chaos.summary import pytest_terminal_summary  # noqa: F401  (prints the scenario table)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/chaos/" in str(item.fspath):
            item.add_marker(pytest.mark.chaos)
