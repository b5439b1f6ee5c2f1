"""A deliberately pessimistic estimate of a chat completion's cost, to reserve before the call.

The estimate only has to be an upper bound that is cheap to compute: the broker reserves it, and
RecordUsage later settles the reservation with the cost OpenRouter actually reported.
"""

from __future__ import annotations

import decimal
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

DEFAULT_MAX_TOKENS = 1024
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class CostEstimator:
    """Estimate = ceil(prompt characters / 4) × prompt price + max_tokens × completion price.

    Prices are USD per token; the defaults ($10 / $20 per million tokens) are above most models'.
    """

    max_completion_price_per_token: Decimal = Decimal("0.00002")
    max_prompt_price_per_token: Decimal = Decimal("0.00001")
    default_max_tokens: int = DEFAULT_MAX_TOKENS

    def estimate(self, payload: Mapping[str, Any]) -> Decimal:
        """The estimated cost in USD of sending ``payload`` to /chat/completions, exact."""
        prompt_tokens = -(-prompt_chars(payload) // CHARS_PER_TOKEN)
        with decimal.localcontext() as ctx:
            # Exactness is the point: fail loudly rather than round money silently.
            ctx.prec = 60
            ctx.traps[decimal.Inexact] = True
            ctx.traps[decimal.Rounded] = True
            return (
                prompt_tokens * self.max_prompt_price_per_token
                + max_tokens(payload, self.default_max_tokens) * self.max_completion_price_per_token
            )


def max_tokens(payload: Mapping[str, Any], default: int = DEFAULT_MAX_TOKENS) -> int:
    """The completion token cap the payload asks for (``max_tokens``), else ``default``."""
    value = payload.get("max_tokens")
    if value is None:
        value = payload.get("max_completion_tokens")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("max_tokens must be a non-negative integer")
    return value


def prompt_chars(payload: Mapping[str, Any]) -> int:
    """Characters of prompt text: message contents (text parts), a bare ``prompt``, and tools."""
    total = 0
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        total += len(prompt)
    messages = payload.get("messages")
    if isinstance(messages, list):
        total += sum(_message_chars(message) for message in messages if isinstance(message, Mapping))
    tools = payload.get("tools")
    if tools:
        # Tool definitions are rendered into the prompt, so they cost prompt tokens too.
        total += len(json.dumps(tools, default=str))
    return total


def _message_chars(message: Mapping[str, Any]) -> int:
    content = message.get("content")
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(text) for text in _text_parts(content))
    return 0


def _text_parts(parts: Iterable[Any]) -> Iterable[str]:
    for part in parts:
        if isinstance(part, Mapping) and isinstance(part.get("text"), str):
            yield part["text"]
