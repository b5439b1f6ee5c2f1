"""Fault injection: rules that make the sandbox fail like the real service sometimes does."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from broker.sandbox.wire import ApiError

MAX_DELAY_SECONDS: Final = 60.0


@dataclass(frozen=True)
class Fault:
    """One rule: for requests matching ``method`` (``None`` = any) and ``path_prefix``, ``times`` times,
    wait ``delay_seconds``, then answer ``status`` (with ``message`` and ``retry_after``) — or perform
    the request for real and drop the connection without an answer (``drop_response``)."""

    path_prefix: str = "/api/v1"
    method: str | None = None
    times: int = 1
    status: int | None = None
    message: str | None = None
    retry_after: str | None = None
    delay_seconds: float = 0.0
    drop_response: bool = False

    def __post_init__(self) -> None:
        if self.times < 1:
            raise ValueError("times must be at least 1")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        if not 0 <= self.delay_seconds <= MAX_DELAY_SECONDS:
            raise ValueError(f"delay_seconds must be between 0 and {MAX_DELAY_SECONDS:g}")
        if self.status is not None and self.drop_response:
            raise ValueError("a fault either answers a status or drops the response, not both")
        if self.status is None and not self.drop_response and not self.delay_seconds:
            raise ValueError("a fault needs a status, a delay or drop_response")
        if not self.path_prefix.startswith("/"):
            raise ValueError("path_prefix must start with /")

    def matches(self, method: str, path: str) -> bool:
        method_ok = self.method is None or self.method.upper() == method.upper()
        return method_ok and path.startswith(self.path_prefix)

    def to_json(self) -> dict[str, object]:
        return {
            "path_prefix": self.path_prefix,
            "method": self.method,
            "times": self.times,
            "status": self.status,
            "message": self.message,
            "retry_after": self.retry_after,
            "delay_seconds": Decimal(str(self.delay_seconds)),
            "drop_response": self.drop_response,
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Fault:
        """Build a fault from the ``POST /_sandbox/faults`` body; a bad body is a 400."""
        unknown = set(body) - set(cls.__dataclass_fields__)
        if unknown:
            raise ApiError(400, f"unknown fault fields: {', '.join(sorted(unknown))}")
        try:
            return cls(
                path_prefix=_typed(body, "path_prefix", str, "/api/v1"),
                method=_optional_method(body.get("method")),
                times=_typed(body, "times", int, 1),
                status=_typed(body, "status", int, None),
                message=_typed(body, "message", str, None),
                retry_after=_retry_after(body.get("retry_after")),
                delay_seconds=float(_typed(body, "delay_seconds", (int, Decimal), 0)),
                drop_response=_typed(body, "drop_response", bool, False),
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None


def _typed(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ValueError(f"{name} has the wrong type")
    return value


def _optional_method(value: object) -> str | None:
    if value is None or value in ("*", "ANY", "any"):
        return None
    if not isinstance(value, str) or not value.isalpha():
        raise ValueError("method must be an HTTP method name, '*' or null")
    return value.upper()


def _retry_after(value: object) -> str | None:
    """``Retry-After`` header text; a number is sent as whole or fractional seconds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValueError("retry_after must be a string or a number")
    return str(value)


@dataclass
class _Rule:
    fault: Fault
    remaining: int


class FaultRules:
    """The active faults, first added first matched; each disappears after firing ``times`` times."""

    def __init__(self) -> None:
        self._rules: list[_Rule] = []
        self._fired: asyncio.Condition | None = None
        self.fired_count = 0

    async def wait_fired(self, count: int = 1) -> None:
        """Wait until faults have fired `count` times in all (tests await this, never sleep)."""
        if self._fired is None:
            self._fired = asyncio.Condition()
        async with self._fired:
            await self._fired.wait_for(lambda: self.fired_count >= count)

    async def _notify(self) -> None:
        if self._fired is not None:
            async with self._fired:
                self._fired.notify_all()

    def add(self, fault: Fault) -> None:
        self._rules.append(_Rule(fault, fault.times))

    def clear(self) -> int:
        """Remove every fault; returns how many were still active."""
        count = len(self._rules)
        self._rules.clear()
        return count

    def pending(self) -> list[tuple[Fault, int]]:
        """Each active fault with the number of times it will still fire."""
        return [(rule.fault, rule.remaining) for rule in self._rules]

    def take(self, method: str, path: str) -> Fault | None:
        """The first fault matching this request, counting one firing of it."""
        for rule in self._rules:
            if rule.fault.matches(method, path):
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._rules.remove(rule)
                self.fired_count += 1
                if self._fired is not None:
                    asyncio.get_running_loop().create_task(self._notify())
                return rule.fault
        return None
