"""Async client for OpenRouter's key-management API; maps every HTTP failure to a domain error.

One long-lived ``httpx.AsyncClient`` per instance. Money travels as exact JSON numbers both ways
(``Decimal`` in Python, never float). Messages of raised errors never contain a key, a secret or the
management key: the response body is never quoted back.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any, Final, Self

import httpx

from broker.errors import ProviderError, ProviderKeyNotFound, ProviderRejected, ProviderUnavailable

PAGE_SIZE: Final = 100
_BACKOFF_SECONDS: Final = (0.2, 0.5, 1.0, 2.0)
_MAX_RETRY_AFTER_SECONDS: Final = 5.0
_ATTRIBUTION_HEADERS: Final = {"X-OpenRouter-Title": "keybroker"}
_REJECTIONS: Final = {
    400: "OpenRouter rejected the request as invalid (400)",
    401: "OpenRouter rejected the management key (401)",
    402: "OpenRouter reports insufficient credits (402)",
    403: "OpenRouter refused the operation for the management key (403)",
}


class _Unset(enum.Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset.UNSET
"""Default of ``update_key`` fields: leave the field out of the PATCH body (``None`` sends null)."""


# --- JSON with exact decimals ------------------------------------------------------------------


def dumps_json(value: object) -> str:
    """Serialise like ``json.dumps``, but a ``Decimal`` becomes an exact JSON number (``12.34``)."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("JSON numbers must be finite")
        text = format(value, "f")
        return "0" if text in ("-0", "0") else text
    if isinstance(value, Mapping):
        items = (f"{json.dumps(str(k))}:{dumps_json(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps_json(v) for v in value) + "]"
    if isinstance(value, float):
        raise TypeError("money must be Decimal, never float")
    return json.dumps(value)


def loads_json(text: str | bytes) -> Any:
    """Parse JSON with every non-integer number as an exact ``Decimal``."""
    return json.loads(text, parse_float=Decimal)


# --- response models ---------------------------------------------------------------------------


# Told of every call: (endpoint, HTTP method, seconds, error reason or None). The metrics use it.
ProviderObserver = Callable[[str, str, float, str | None], None]


@dataclass(frozen=True)
class ProviderKey:
    """One OpenRouter key as the provider reports it (never carries the secret)."""

    hash: str
    name: str
    label: str
    disabled: bool
    limit: Decimal | None
    limit_remaining: Decimal | None
    limit_reset: str | None
    usage: Decimal
    usage_monthly: Decimal
    created_at: str
    updated_at: str | None

    @classmethod
    def from_json(cls, data: object) -> ProviderKey:
        """Parse a key object leniently: missing or null period counters count as zero."""
        if not isinstance(data, dict) or not isinstance(data.get("hash"), str):
            raise ValueError("not a key object")
        return cls(
            hash=data["hash"],
            name=_text(data.get("name")) or "",
            label=_text(data.get("label")) or "",
            disabled=data.get("disabled") is True,
            limit=_money_or_none(data.get("limit")),
            limit_remaining=_money_or_none(data.get("limit_remaining")),
            limit_reset=_text(data.get("limit_reset")),
            usage=_money_or_none(data.get("usage")) or Decimal(0),
            usage_monthly=_money_or_none(data.get("usage_monthly")) or Decimal(0),
            created_at=_text(data.get("created_at")) or "",
            updated_at=_text(data.get("updated_at")),
        )


@dataclass(frozen=True)
class CreatedKey:
    """A freshly created key: the only time OpenRouter ever returns its secret."""

    key: ProviderKey
    secret: str = field(repr=False)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _money_or_none(value: object) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | Decimal):
        return Decimal(value)
    if isinstance(value, str):
        try:
            return Decimal(value)
        except InvalidOperation:
            return None
    return None


# --- the client --------------------------------------------------------------------------------


class OpenRouterClient:
    """OpenRouter key management. Reads and updates are retried; ``create_key`` never is."""

    def __init__(
        self,
        base_url: str,
        management_key: str,
        *,
        timeout_seconds: float = 10.0,
        max_retries: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
        observer: ProviderObserver | None = None,
    ) -> None:
        self._management_key = management_key
        self._observer = observer
        self._max_retries = max(0, max_retries)
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            timeout=httpx.Timeout(timeout_seconds),
            headers=_ATTRIBUTION_HEADERS,
            transport=transport,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"OpenRouterClient(base_url={str(self._http.base_url)!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def create_key(
        self, name: str, limit: Decimal | None, limit_reset: str | None = "monthly"
    ) -> CreatedKey:
        """POST /keys. Not retried: after a lost response, look the key up by its (unique) name."""
        body: dict[str, object] = {"name": name}
        if limit is not None:
            body["limit"] = limit
            body["limit_reset"] = limit_reset
        payload = await self._request("POST", "keys", body=body, retries=0, ok=(200, 201))
        secret = payload.get("key")
        if not isinstance(secret, str) or not secret:
            raise ProviderUnavailable("OpenRouter sent a create response without a key", 201)
        return CreatedKey(key=_parse_key(payload), secret=secret)

    async def get_key(self, key_hash: str) -> ProviderKey:
        return _parse_key(await self._request("GET", _key_path(key_hash)))

    async def update_key(
        self,
        key_hash: str,
        *,
        disabled: bool | None = None,
        limit: Decimal | _Unset | None = UNSET,
        limit_reset: str | _Unset | None = UNSET,
        name: str | None = None,
    ) -> ProviderKey:
        """PATCH /keys/{hash}: only the given fields change; ``limit=None`` removes the cap."""
        body: dict[str, object] = {}
        if name is not None:
            body["name"] = name
        if disabled is not None:
            body["disabled"] = disabled
        if not isinstance(limit, _Unset):
            body["limit"] = limit
        if not isinstance(limit_reset, _Unset):
            body["limit_reset"] = limit_reset
        return _parse_key(await self._request("PATCH", _key_path(key_hash), body=body))

    async def delete_key(self, key_hash: str) -> None:
        await self._request("DELETE", _key_path(key_hash), ok=(200, 204))

    async def list_keys(self, *, offset: int = 0, include_disabled: bool = False) -> list[ProviderKey]:
        """One page (at most 100 keys, most recent first) of the default workspace's keys."""
        params = {"offset": str(offset), "include_disabled": "true" if include_disabled else "false"}
        payload = await self._request("GET", "keys", params=params)
        items = payload.get("data")
        if not isinstance(items, list):
            raise ProviderUnavailable("OpenRouter sent an unreadable key list", 200)
        try:
            return [ProviderKey.from_json(item) for item in items]
        except ValueError:
            raise ProviderUnavailable("OpenRouter sent an unreadable key list", 200) from None

    async def list_all_keys(self, *, include_disabled: bool = True) -> list[ProviderKey]:
        """Every page; a key created meanwhile shifts the pages, so repeats are dropped by hash."""
        keys: dict[str, ProviderKey] = {}
        offset = 0
        while True:
            page = await self.list_keys(offset=offset, include_disabled=include_disabled)
            for key in page:
                keys.setdefault(key.hash, key)
            offset += len(page)
            if len(page) < PAGE_SIZE:
                return list(keys.values())

    async def find_keys_by_name(self, name: str) -> list[ProviderKey]:
        """Every key (disabled included) with exactly this name; how a lost create is recovered."""
        return [key for key in await self.list_all_keys(include_disabled=True) if key.name == name]

    async def get_current_key_info(self, api_key: str) -> dict[str, Any]:
        """GET /key with ``api_key`` as the bearer: the provider's view of that key (``data``)."""
        payload = await self._request("GET", "key", api_key=api_key)
        data = payload.get("data")
        if not isinstance(data, dict):
            raise ProviderUnavailable("OpenRouter sent unreadable key information", 200)
        return data

    # --- transport ---------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, object] | None = None,
        api_key: str | None = None,
        retries: int | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> dict[str, Any]:
        """Send one call, retrying ``ProviderUnavailable`` with a short backoff."""
        attempts = 1 + (self._max_retries if retries is None else retries)
        for attempt in range(attempts):
            response: httpx.Response | None = None
            started = time.perf_counter()
            try:
                response = await self._send(method, path, params, body, api_key)
                decoded = _decode(response, ok, user_key=api_key is not None)
                self._observe(path, method, started, None)
                return decoded
            except ProviderError as error:
                self._observe(path, method, started, error.reason)
                if not isinstance(error, ProviderUnavailable) or attempt + 1 >= attempts:
                    raise
            await asyncio.sleep(_retry_delay(attempt, response))
        raise AssertionError("unreachable")

    def _observe(self, path: str, method: str, started: float, error: str | None) -> None:
        if self._observer is not None:
            endpoint = "keys/{hash}" if path.startswith("keys/") else path
            self._observer(endpoint, method, time.perf_counter() - started, error)

    async def _send(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        body: dict[str, object] | None,
        api_key: str | None,
    ) -> httpx.Response:
        bearer = self._management_key if api_key is None else api_key
        headers = {"Authorization": f"Bearer {bearer}"}
        content: str | None = None
        if body is not None:
            content = dumps_json(body)
            headers["Content-Type"] = "application/json"
        try:
            return await self._http.request(method, path, params=params, content=content, headers=headers)
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable("OpenRouter did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise ProviderUnavailable("OpenRouter could not be reached") from exc


def _key_path(key_hash: str) -> str:
    return "keys/" + urllib.parse.quote(key_hash, safe="")


def _parse_key(payload: dict[str, Any]) -> ProviderKey:
    try:
        return ProviderKey.from_json(payload.get("data"))
    except ValueError:
        raise ProviderUnavailable("OpenRouter sent an unreadable key object", 200) from None


def _decode(response: httpx.Response, ok: tuple[int, ...], *, user_key: bool) -> dict[str, Any]:
    """The parsed JSON object of a successful answer, or the domain error for this status."""
    status = response.status_code
    if status == 204 and status in ok:
        return {}
    if status in ok:
        try:
            payload = loads_json(response.content)
        except ValueError:
            raise ProviderUnavailable("OpenRouter sent an unreadable answer", status) from None
        if not isinstance(payload, dict):
            raise ProviderUnavailable("OpenRouter sent an unreadable answer", status)
        return payload
    raise _status_error(response, user_key=user_key)


def _status_error(response: httpx.Response, *, user_key: bool) -> Exception:
    status = response.status_code
    if status == 429:
        retry_after = _retry_after(response)
        return ProviderUnavailable("OpenRouter is rate limiting requests (429)", status, retry_after or 1.0)
    if status >= 500:
        return ProviderUnavailable(
            f"OpenRouter is unavailable ({status})", status, _retry_after(response) or 1.0
        )
    if status == 404:
        return ProviderKeyNotFound("no OpenRouter key with that hash", status)
    if status in _REJECTIONS:
        message = _REJECTIONS[status]
        if user_key and status == 401:
            message = "OpenRouter rejected the API key (401)"
        error_type = _error_type(response)
        metadata = {"error_type": error_type} if error_type else {}
        return ProviderRejected(message, status, **metadata)
    return ProviderUnavailable(f"OpenRouter answered with unexpected status {status}", status)


def _error_type(response: httpx.Response) -> str | None:
    """``error.metadata.error_type`` when it is a plain identifier (never free text)."""
    try:
        value = loads_json(response.content)["error"]["metadata"]["error_type"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(value, str) and len(value) <= 40 and value.replace("_", "").isalnum():
        return value
    return None


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds; an HTTP date or garbage counts as absent."""
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    if not 0 <= seconds < float("inf"):  # also rejects NaN
        return None
    return seconds


def _retry_delay(attempt: int, response: httpx.Response | None) -> float:
    retry_after = _retry_after(response) if response is not None else None
    if retry_after is not None:
        return min(retry_after, _MAX_RETRY_AFTER_SECONDS)
    return _BACKOFF_SECONDS[min(attempt, len(_BACKOFF_SECONDS) - 1)]
