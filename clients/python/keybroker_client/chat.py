# ruff: noqa: ASYNC109 - `timeout` is the HTTP timeout handed to httpx, part of the public API.
"""One budgeted OpenRouter chat completion: reserve the estimate, call with the user's key, record.

The flow (``openrouter_chat``):
1. estimate the cost (``CostEstimator``) and reserve it with CheckLimit; a refusal raises
   ``BudgetExceededError`` before anything reaches OpenRouter;
2. take the user's key from the cache, current as of the key version CheckLimit reports;
3. POST ``{base}/chat/completions``; on 401 report the key with ReportKeyInvalid and, when the
   broker has a newer key (it confirmed the old one dead and rotated, or ours was stale), retry
   once with it; on any other failure release the reservation and raise ``OpenRouterError``;
4. record the actual usage with RecordUsage under OpenRouter's generation id, retried on
   ``UnavailableError`` (the generation id makes retries idempotent).

The API key only ever travels in the Authorization header: it is never logged nor put into an
exception, and no exception raised here chains an httpx object that holds the request headers.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import Mapping
from decimal import ROUND_CEILING, Decimal
from typing import Any, Protocol

import httpx
from keybroker.v1 import keybroker_pb2

from .cost import CostEstimator
from .errors import BudgetExceededError, OpenRouterError, UnavailableError, redact
from .messages import Money, new_request_id

__all__ = ["RECORD_USAGE_RETRIES", "BrokerForChat", "openrouter_chat"]

RECORD_USAGE_RETRIES = 3
"""RecordUsage is retried this many times after a first UNAVAILABLE answer."""

_RETRY_DELAY_CAP = 2.0
_USD_QUANTUM = Decimal("1E-10")  # the proto allows at most 10 digits after the point


class BrokerForChat(Protocol):
    """The parts of ``KeyBrokerClient`` the chat flow needs (a fake can stand in for tests)."""

    async def check_limit(
        self, user_id: str, *, estimated_cost_usd: Money | None = ..., request_id: str | None = ...
    ) -> keybroker_pb2.CheckLimitResponse: ...

    async def get_key_cached(
        self, user_id: str, current_version: int | None = ...
    ) -> keybroker_pb2.GetKeyResponse: ...

    def invalidate_key(self, user_id: str) -> None: ...

    async def report_key_invalid(
        self, user_id: str, key_id: str, http_status: int = ...
    ) -> keybroker_pb2.ReportKeyInvalidResponse: ...

    async def release_reservation(
        self, user_id: str, reservation_id: str
    ) -> keybroker_pb2.ReleaseReservationResponse: ...

    async def record_usage(
        self,
        user_id: str,
        *,
        request_id: str,
        cost_usd: Money,
        reservation_id: str | None = ...,
        model: str = ...,
        agent: str = ...,
        prompt_tokens: int = ...,
        completion_tokens: int = ...,
        total_tokens: int = ...,
        duration: datetime.timedelta | None = ...,
    ) -> keybroker_pb2.RecordUsageResponse: ...


async def openrouter_chat(
    broker: BrokerForChat,
    user_id: str,
    payload: Mapping[str, Any],
    *,
    agent: str = "",
    openrouter_base_url: str = "https://openrouter.ai/api/v1",
    http_client: httpx.AsyncClient,
    estimator: CostEstimator | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Send ``payload`` to OpenRouter's /chat/completions within the user's budget.

    Returns OpenRouter's reply parsed with ``parse_float=Decimal`` (so ``usage.cost`` is exact).
    Raises ``BudgetExceededError``, ``OpenRouterError`` or any ``KeybrokerClientError``.
    """
    if payload.get("stream"):
        raise ValueError("streaming completions are not supported by openrouter_chat")
    estimate = ceil_usd((estimator or CostEstimator()).estimate(payload))
    check_id = new_request_id()
    check = await broker.check_limit(
        user_id, estimated_cost_usd=estimate if estimate > 0 else None, request_id=check_id
    )
    if not check.allowed:
        raise _budget_exceeded(user_id, estimate, check)
    reservation_id = check.reservation_id
    try:
        # key_version 0 means the broker did not say; the cached key is then taken as current.
        key = await broker.get_key_cached(user_id, current_version=check.key_version or None)
        started = time.monotonic()
        try:
            reply = await _post_completion(http_client, openrouter_base_url, key.api_key, payload, timeout)
        except OpenRouterError as err:
            if err.status != 401 or not await _replaced_after_401(broker, user_id, key):
                raise
            key = await broker.get_key_cached(user_id)  # the key the broker now hands out
            started = time.monotonic()
            reply = await _post_completion(http_client, openrouter_base_url, key.api_key, payload, timeout)
    except OpenRouterError as err:
        if err.status == 401:
            broker.invalidate_key(user_id)
        await _release(broker, user_id, reservation_id)
        raise
    except Exception:
        await _release(broker, user_id, reservation_id)
        raise
    elapsed = datetime.timedelta(seconds=time.monotonic() - started)
    await _record(
        broker,
        user_id,
        reply,
        fallback_request_id=check_id,
        reservation_id=reservation_id,
        agent=agent,
        duration=elapsed,
    )
    return reply


async def _replaced_after_401(broker: BrokerForChat, user_id: str, key: keybroker_pb2.GetKeyResponse) -> bool:
    """Report the refused key; True when the broker now has another key for the user (it
    confirmed ours dead and rotated it, or ours was already stale), so one retry makes sense."""
    broker.invalidate_key(user_id)
    reply = await broker.report_key_invalid(user_id, key.key_id, 401)
    replaced = (
        keybroker_pb2.KEY_REPORT_OUTCOME_ROTATED,
        keybroker_pb2.KEY_REPORT_OUTCOME_STALE_KEY,
    )
    return reply.outcome in replaced and reply.key_id != key.key_id


def ceil_usd(amount: Decimal) -> Decimal:
    """``amount`` rounded up to the proto's 10 decimal places (never under-reserve or under-bill)."""
    return amount.quantize(_USD_QUANTUM, rounding=ROUND_CEILING).normalize()


async def _post_completion(
    http: httpx.AsyncClient, base_url: str, api_key: str, payload: Mapping[str, Any], timeout: float
) -> dict[str, Any]:
    url = f"{base_url.rstrip('/')}/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        response = await http.post(url, json=dict(payload), headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        # `from None`: the httpx exception holds the request, and so the key in its headers.
        raise OpenRouterError(None, f"request failed: {type(exc).__name__}") from None
    if not response.is_success:
        message = redact(_error_message(response), (api_key,))
        raise OpenRouterError(response.status_code, message) from None
    try:
        reply = json.loads(response.content, parse_float=Decimal)
    except ValueError:
        raise OpenRouterError(response.status_code, "the reply is not valid JSON") from None
    if not isinstance(reply, dict):
        raise OpenRouterError(response.status_code, "the reply is not a JSON object")
    return reply


def _error_message(response: httpx.Response) -> str:
    """OpenRouter's ``{"error": {"message": ...}}``, else the reason phrase."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:500]
    return response.reason_phrase or "error"


async def _release(broker: BrokerForChat, user_id: str, reservation_id: str) -> None:
    """Best effort: an unreleased reservation still expires on the broker's own."""
    if not reservation_id:
        return
    try:
        await broker.release_reservation(user_id, reservation_id)
    except Exception:  # noqa: S110 - the original failure matters more; the reservation expires
        pass


async def _record(
    broker: BrokerForChat,
    user_id: str,
    reply: Mapping[str, Any],
    *,
    fallback_request_id: str,
    reservation_id: str,
    agent: str,
    duration: datetime.timedelta,
) -> keybroker_pb2.RecordUsageResponse:
    """RecordUsage under the generation id (else ``fallback_request_id``), retried when UNAVAILABLE."""
    usage = reply.get("usage")
    usage = usage if isinstance(usage, Mapping) else {}
    generation_id = reply.get("id")
    if not isinstance(generation_id, str) or not generation_id:
        generation_id = fallback_request_id
    arguments: dict[str, Any] = {
        "request_id": generation_id,
        "reservation_id": reservation_id,
        "model": str(reply.get("model") or ""),
        "agent": agent,
        "prompt_tokens": _int(usage.get("prompt_tokens")),
        "completion_tokens": _int(usage.get("completion_tokens")),
        "total_tokens": _int(usage.get("total_tokens")),
        "cost_usd": ceil_usd(_decimal(usage.get("cost"))),
        "duration": duration,
    }
    for attempt in range(RECORD_USAGE_RETRIES + 1):
        try:
            return await broker.record_usage(user_id, **arguments)
        except UnavailableError as err:
            if attempt == RECORD_USAGE_RETRIES:
                raise
            await asyncio.sleep(_retry_delay(err, attempt))
    raise AssertionError("unreachable")


def _retry_delay(err: UnavailableError, attempt: int) -> float:
    hint = err.retry_after if err.retry_after is not None else 0.2 * 2**attempt
    return max(0.0, min(hint, _RETRY_DELAY_CAP))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _decimal(value: Any) -> Decimal:
    if isinstance(value, Decimal) and value.is_finite() and value >= 0:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Decimal(value)
    return Decimal(0)


def _budget_exceeded(
    user_id: str, estimate: Decimal, check: keybroker_pb2.CheckLimitResponse
) -> BudgetExceededError:
    return BudgetExceededError(
        user_id,
        estimate,
        limit_usd=check.limit_usd,
        usage_usd=check.spent_usd,
        reserved_usd=check.reserved_usd,
        remaining_usd=check.remaining_usd,
    )
