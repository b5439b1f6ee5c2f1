"""Deterministic chat completions: token counts, a small price table and the exact cost. No HTTP."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from broker.sandbox.wire import ApiError

MAX_COMPLETION_TOKENS: Final = 16
DEFAULT_PRICE: Final = (Decimal("0.000001"), Decimal("0.000002"))
"""USD per prompt token and per completion token for a model not in ``PRICES``."""
PRICES: Final[Mapping[str, tuple[Decimal, Decimal]]] = {
    "openai/gpt-4o-mini": (Decimal("0.00000015"), Decimal("0.0000006")),
    "openai/gpt-4o": (Decimal("0.0000025"), Decimal("0.00001")),
    "anthropic/claude-sonnet-4": (Decimal("0.000003"), Decimal("0.000015")),
    "sandbox/free": (Decimal(0), Decimal(0)),
}
REPLY_TEXT: Final = "This is the OpenRouter sandbox: no model was called and nothing was billed."


@dataclass(frozen=True)
class ChatRequest:
    model: str
    prompt_chars: int
    max_tokens: int | None


@dataclass(frozen=True)
class ChatUsage:
    prompt_tokens: int
    completion_tokens: int
    prompt_cost: Decimal
    completion_cost: Decimal

    @property
    def cost(self) -> Decimal:
        return self.prompt_cost + self.completion_cost


def parse_chat_request(body: Mapping[str, Any]) -> ChatRequest:
    """The parts of ``POST /chat/completions`` the sandbox needs, or a 400."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages is required and must be a non-empty array")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise ApiError(400, "max_tokens must be a positive integer")
    return ChatRequest(model, sum(_message_chars(m) for m in messages), max_tokens)


def _message_chars(message: object) -> int:
    if not isinstance(message, dict):
        raise ApiError(400, "each message must be an object")
    content = message.get("content")
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part["text"]) for part in content if _is_text_part(part))
    raise ApiError(400, "message content must be a string or an array of parts")


def _is_text_part(part: object) -> bool:
    return isinstance(part, dict) and isinstance(part.get("text"), str)


def price_of(model: str) -> tuple[Decimal, Decimal]:
    return PRICES.get(model, DEFAULT_PRICE)


def usage_for(request: ChatRequest) -> ChatUsage:
    """prompt = ceil(chars / 4) (≥ 1); completion = min(max_tokens or 16, 16); cost exact."""
    prompt_tokens = max(1, math.ceil(request.prompt_chars / 4))
    completion_tokens = min(request.max_tokens or MAX_COMPLETION_TOKENS, MAX_COMPLETION_TOKENS)
    prompt_price, completion_price = price_of(request.model)
    return ChatUsage(
        prompt_tokens,
        completion_tokens,
        prompt_tokens * prompt_price,
        completion_tokens * completion_price,
    )


def completion_json(request: ChatRequest, usage: ChatUsage, now: datetime) -> dict[str, object]:
    """The chat.completion body, with a ``usage`` block like the real one's."""
    return {
        "id": "gen-" + secrets.token_hex(12),
        "object": "chat.completion",
        "created": int(now.timestamp()),
        "model": request.model,
        "provider": "sandbox",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": REPLY_TEXT},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "cost": usage.cost,
            "is_byok": False,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
            "cost_details": {
                "upstream_inference_cost": None,
                "upstream_inference_prompt_cost": usage.prompt_cost,
                "upstream_inference_completions_cost": usage.completion_cost,
            },
        },
    }
