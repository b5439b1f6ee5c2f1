"""Logging set-up: one line per event, as text for a terminal or JSON for collectors.

Secrets are never passed to the logger in the first place; as a second line of defence every
record is scrubbed of anything shaped like an OpenRouter key or a caller token.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

SECRET_SHAPES = re.compile(r"sk-or-v1-[0-9a-f]{8,}|kbt_[0-9a-f]{16}_[A-Za-z0-9_-]{10,}")
EXTRA_FIELDS = ("rpc", "status", "duration_ms", "caller", "user_id", "request_id", "port")


def scrub(text: str) -> str:
    return SECRET_SHAPES.sub("[redacted]", text)


class ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, scrub(value))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ScrubFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Per-call access lines are useful at DEBUG; INFO keeps start-up, changes and warnings.
    logging.getLogger("keybroker.rpc").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
