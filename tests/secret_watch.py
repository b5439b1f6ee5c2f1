"""Secret hygiene across the whole test session (issue 5.7).

Every OpenRouter key the sandboxes issue, every caller token and every master key made during the
session is remembered, and every log record of the session is captured (rendered with the JSON
formatter, extras included). When the session ends, no secret may appear in that output.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import pytest

from broker import auth, crypto
from broker.logs import JsonFormatter
from broker.sandbox.state import SandboxState

SECRETS: set[str] = set()
CAPTURED = io.StringIO()


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            CAPTURED.write(self.format(record) + "\n")
        except Exception:  # a capture must never break a test
            CAPTURED.write(str(record.msg) + "\n")


def _remember(original: Callable[..., Any], pick: Callable[[Any], str]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        SECRETS.add(pick(result))
        return result

    return wrapper


def install() -> None:
    root = logging.getLogger()
    root.addHandler(_Capture())
    root.setLevel(min(root.level or logging.DEBUG, logging.DEBUG))
    SandboxState.create_key = _remember(SandboxState.create_key, lambda key: key.secret)  # type: ignore[method-assign]
    auth.new_token = _remember(auth.new_token, lambda issued: issued.token)  # type: ignore[assignment]
    crypto.generate_master_key = _remember(crypto.generate_master_key, lambda key: key)  # type: ignore[assignment]


def leaks() -> list[str]:
    text = CAPTURED.getvalue()
    return sorted(secret[:12] + "…" for secret in SECRETS if secret and secret in text)


def report(session: pytest.Session) -> None:
    found = leaks()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(
            f"secret hygiene: {len(SECRETS)} secrets issued, {len(CAPTURED.getvalue())} characters of "
            f"log output scanned, {len(found)} leaked"
        )
    if found:
        if reporter is not None:
            reporter.write_line(f"LEAKED (prefixes): {', '.join(found)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
