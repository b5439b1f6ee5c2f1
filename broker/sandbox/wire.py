"""What the sandbox shares with every route: OpenRouter-style errors and exact-decimal JSON bodies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from broker.openrouter import dumps_json, loads_json

ERROR_TYPES: Final = {
    400: "bad_request",
    401: "authentication",
    402: "payment_required",
    403: "permission_denied",
    404: "not_found",
    405: "bad_request",
    408: "timeout",
    429: "rate_limit_exceeded",
}
DEFAULT_MESSAGES: Final = {
    400: "Bad request",
    401: "User not found.",
    402: "Insufficient credits. Add more using https://openrouter.ai/credits",
    403: "Forbidden",
    404: "Not found",
    429: "Rate limit exceeded",
    500: "Internal Server Error",
    502: "Bad gateway",
    503: "Service unavailable",
}


class ApiError(Exception):
    """An answer other than success, in OpenRouter's terms (status, message, error type)."""

    def __init__(self, status: int, message: str | None = None, error_type: str | None = None) -> None:
        self.status = status
        self.message = message or DEFAULT_MESSAGES.get(status, "Error")
        self.error_type = error_type or error_type_for(status)
        super().__init__(f"{status} {self.message}")


def error_type_for(status: int) -> str:
    return ERROR_TYPES.get(status, "server" if status >= 500 else "bad_request")


def error_response(
    status: int,
    message: str | None = None,
    error_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    error = ApiError(status, message, error_type)
    body = {
        "error": {
            "code": status,
            "message": error.message,
            "metadata": {"error_type": error.error_type},
        }
    }
    return json_response(body, status=status, headers=headers)


def json_response(
    body: Mapping[str, object], *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON answer whose money fields are exact numbers (no float on the way)."""
    return web.Response(
        text=dumps_json(body), status=status, content_type="application/json", headers=headers
    )


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object (decimals exact), or a 400."""
    text = await request.text()
    try:
        body = loads_json(text) if text.strip() else None
    except ValueError:
        raise ApiError(400, "Invalid JSON body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    return body
