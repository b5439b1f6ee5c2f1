"""Async Python client of the keybroker gRPC service.

Example::

  async with KeyBrokerClient("broker:50051", token) as broker:
      reply = await broker.openrouter_chat(user_id, {"model": "openai/gpt-4o", "messages": [...]})
"""

from .client import KeyBrokerClient
from .cost import CostEstimator
from .errors import (
    AuthenticationError,
    BudgetExceededError,
    InvalidArgumentError,
    KeybrokerClientError,
    KeyDisabledError,
    KeyExistsError,
    MonthlyLimitExceededError,
    NoApiKeyError,
    OpenRouterError,
    PermissionDeniedError,
    UnavailableError,
    from_rpc_error,
)
from .watch import KeyEventStream

__all__ = [
    "AuthenticationError",
    "BudgetExceededError",
    "CostEstimator",
    "InvalidArgumentError",
    "KeyBrokerClient",
    "KeyDisabledError",
    "KeyEventStream",
    "KeyExistsError",
    "KeybrokerClientError",
    "MonthlyLimitExceededError",
    "NoApiKeyError",
    "OpenRouterError",
    "PermissionDeniedError",
    "UnavailableError",
    "from_rpc_error",
]
