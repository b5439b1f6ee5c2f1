# ruff: noqa: ASYNC109 - a per-call `timeout` that becomes the gRPC deadline is this API's contract.
"""``KeyBrokerClient``: one long-lived async channel to the broker, one method per RPC.

Methods take plain Python values (``Decimal`` money, ``timedelta`` durations, ``None`` for unset
optional fields) and return the generated response messages. Every call carries the bearer token
and a deadline; a failed call raises a ``KeybrokerClientError`` subclass (see ``errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import httpx
from google.protobuf.message import Message
from keybroker.v1 import keybroker_pb2

from . import messages
from .cache import KeyCache
from .chat import openrouter_chat
from .cost import CostEstimator
from .errors import UnavailableError, from_rpc_error
from .messages import Money
from .watch import KeyEventCallback, KeyEventStream, forget, run_key_watch, user_filter

__all__ = ["KeyBrokerClient"]

_Response = TypeVar("_Response", bound=Message)
# A multicallable: awaited for a unary call, iterated for a server-streaming one.
_Rpc = Callable[..., Any]


class KeyBrokerClient:
    """Async client of the ``KeyBroker`` and ``KeyBrokerAdmin`` services.

    Create one per process and reuse it (``async with KeyBrokerClient(...) as broker``): it holds
    the gRPC channel, a key cache and, once ``openrouter_chat`` is used, an HTTP connection pool.
    """

    def __init__(
        self,
        target: str,
        token: str,
        *,
        timeout: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        key_cache_size: int = 1024,
    ) -> None:
        self._target = target
        self._token = token
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout
        self._credentials = credentials
        self._channel_options = list(channel_options)
        # The channel is opened on first use, inside the event loop that will drive it.
        self._channel: Any = None
        self._rpcs: dict[str, _Rpc] = {}
        self._keys = KeyCache(key_cache_size)
        self._http: httpx.AsyncClient | None = None
        self._key_watch: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"KeyBrokerClient(target={self._target!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel and the HTTP pool this client opened; safe to call twice."""
        await self.stop_key_watch()
        channel, self._channel = self._channel, None
        self._rpcs.clear()
        http, self._http = self._http, None
        self._keys.clear()
        if channel is not None:
            await channel.close()
        if http is not None:
            await http.aclose()

    # -- KeyBroker: the hot path -------------------------------------------------------------

    async def get_key(self, user_id: str, *, timeout: float | None = None) -> keybroker_pb2.GetKeyResponse:
        """The user's current OpenRouter key (a secret: never log ``api_key``) and budget."""
        request = messages.get_key_request(user_id)
        return await self._call("KeyBroker", "GetKey", request, keybroker_pb2.GetKeyResponse, timeout)

    async def check_limit(
        self,
        user_id: str,
        *,
        estimated_cost_usd: Money | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> keybroker_pb2.CheckLimitResponse:
        """Whether the user may spend; with an estimate, reserves it (see ``reservation_id``)."""
        request = messages.check_limit_request(
            user_id, estimated_cost_usd=estimated_cost_usd, request_id=request_id
        )
        return await self._call("KeyBroker", "CheckLimit", request, keybroker_pb2.CheckLimitResponse, timeout)

    async def record_usage(
        self,
        user_id: str,
        *,
        request_id: str,
        cost_usd: Money,
        reservation_id: str | None = None,
        model: str = "",
        agent: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        total_tokens: int = 0,
        duration: datetime.timedelta | None = None,
        timeout: float | None = None,
    ) -> keybroker_pb2.RecordUsageResponse:
        """Record one finished OpenRouter call; idempotent by ``request_id`` (the generation id)."""
        request = messages.record_usage_request(
            user_id,
            request_id=request_id,
            cost_usd=cost_usd,
            reservation_id=reservation_id,
            model=model,
            agent=agent,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=total_tokens,
            duration_=duration,
        )
        return await self._call(
            "KeyBroker", "RecordUsage", request, keybroker_pb2.RecordUsageResponse, timeout
        )

    async def release_reservation(
        self, user_id: str, reservation_id: str, *, timeout: float | None = None
    ) -> keybroker_pb2.ReleaseReservationResponse:
        """Release a CheckLimit reservation whose call never happened."""
        request = messages.release_reservation_request(user_id, reservation_id)
        return await self._call(
            "KeyBroker", "ReleaseReservation", request, keybroker_pb2.ReleaseReservationResponse, timeout
        )

    async def rotate_key(
        self,
        user_id: str,
        *,
        request_id: str | None = None,
        grace_period: datetime.timedelta | None = None,
        delete_old: bool = False,
        timeout: float | None = None,
    ) -> keybroker_pb2.RotateKeyResponse:
        """Replace the user's key. Pass your own ``request_id`` to retry safely (default: new UUID)."""
        request = messages.rotate_key_request(
            user_id, request_id=request_id, grace_period=grace_period, delete_old=delete_old
        )
        response = await self._call(
            "KeyBroker", "RotateKey", request, keybroker_pb2.RotateKeyResponse, timeout
        )
        self._keys.invalidate(user_id)
        return response

    async def watch_keys(
        self, user_ids: Iterable[str] | None = None, *, timeout: float | None = None
    ) -> KeyEventStream:
        """Subscribe to key changes (``KeyEvent``: rotated, revoked, disabled, enabled, limit
        changed...) of ``user_ids`` (None: every user), made on any broker replica.

        Returns once the broker confirms the subscription: every change committed from then on
        arrives. Iterate the stream with ``async for``; it has no deadline unless ``timeout`` is
        given, ends when the broker drains, and raises ``UnavailableError`` when the connection
        breaks or the reader falls behind. ``start_key_watch`` does all of that for the key cache.
        """
        request = keybroker_pb2.WatchKeysRequest(user_ids=sorted(user_filter(user_ids) or ()))
        rpc = self._rpc("KeyBroker", "WatchKeys", keybroker_pb2.WatchKeysResponse, streaming=True)
        call = rpc(request, timeout=timeout, metadata=self._metadata)
        return await KeyEventStream.open(call, self._token, self._timeout)

    async def start_key_watch(
        self, user_ids: Iterable[str] | None = None, *, on_event: KeyEventCallback | None = None
    ) -> None:
        """Keep the key cache in step with the broker: a background task watches key events of
        ``user_ids`` (None: every user) and drops the cached key of each event's user, then calls
        ``on_event(event)``; it subscribes again with backoff whenever the stream ends or fails.

        Returns once the first subscription is live. Raises when the broker refuses it (bad token,
        bad filter); when the broker is unreachable it returns and the task keeps trying.
        """
        await self.stop_key_watch()
        users = user_filter(user_ids)
        first: KeyEventStream | None = None
        try:
            first = await self._open_key_watch(users)
        except UnavailableError:
            pass  # the task retries with backoff
        else:
            forget(self._keys, users)  # keys cached before now may predate a change
        self._key_watch = asyncio.create_task(
            run_key_watch(self._open_key_watch, self._keys, users, first, on_event),
            name="keybroker-key-watch",
        )

    async def stop_key_watch(self) -> None:
        """Stop the task of ``start_key_watch`` (if any); safe to call twice."""
        task, self._key_watch = self._key_watch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _open_key_watch(self, users: frozenset[str] | None) -> KeyEventStream:
        return await self.watch_keys(users)

    # -- KeyBrokerAdmin ----------------------------------------------------------------------

    async def provision_key(
        self,
        user_id: str,
        *,
        tier: str = "",
        monthly_limit_usd: Money | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> keybroker_pb2.ProvisionKeyResponse:
        """Create the user's key (tier default "free"). Pass ``request_id`` to retry safely."""
        request = messages.provision_key_request(
            user_id, tier=tier, monthly_limit_usd=monthly_limit_usd, request_id=request_id
        )
        return await self._call(
            "KeyBrokerAdmin", "ProvisionKey", request, keybroker_pb2.ProvisionKeyResponse, timeout
        )

    async def update_key(
        self,
        user_id: str,
        *,
        tier: str | None = None,
        monthly_limit_usd: Money | None = None,
        disabled: bool | None = None,
        timeout: float | None = None,
    ) -> keybroker_pb2.UpdateKeyResponse:
        """Change tier, custom limit (``""`` removes it) or suspension; ``None`` leaves a field as is."""
        request = messages.update_key_request(
            user_id, tier=tier, monthly_limit_usd=monthly_limit_usd, disabled=disabled
        )
        response = await self._call(
            "KeyBrokerAdmin", "UpdateKey", request, keybroker_pb2.UpdateKeyResponse, timeout
        )
        self._keys.invalidate(user_id)
        return response

    async def revoke_key(
        self, user_id: str, *, delete: bool = False, timeout: float | None = None
    ) -> keybroker_pb2.RevokeKeyResponse:
        """Revoke the user's key (delete it at OpenRouter with ``delete=True``)."""
        request = messages.revoke_key_request(user_id, delete=delete)
        response = await self._call(
            "KeyBrokerAdmin", "RevokeKey", request, keybroker_pb2.RevokeKeyResponse, timeout
        )
        self._keys.invalidate(user_id)
        return response

    async def get_key_info(
        self, user_id: str, *, timeout: float | None = None
    ) -> keybroker_pb2.GetKeyInfoResponse:
        """One user's key metadata with this month's spend; never the secret."""
        request = messages.get_key_info_request(user_id)
        return await self._call(
            "KeyBrokerAdmin", "GetKeyInfo", request, keybroker_pb2.GetKeyInfoResponse, timeout
        )

    async def report_key_invalid(
        self, user_id: str, key_id: str, http_status: int = 401, *, timeout: float | None = None
    ) -> keybroker_pb2.ReportKeyInvalidResponse:
        """Tell the broker OpenRouter refused this key; it rotates the key only if OpenRouter
        confirms it dead. Drops the cached key of the user when the answer names a new version."""
        request = messages.report_key_invalid_request(user_id, key_id, http_status)
        reply: keybroker_pb2.ReportKeyInvalidResponse = await self._call(
            "KeyBroker", "ReportKeyInvalid", request, keybroker_pb2.ReportKeyInvalidResponse, timeout
        )
        if reply.key_id != key_id:
            self.invalidate_key(user_id)
        return reply

    async def reconcile(
        self, *, dry_run: bool = False, timeout: float | None = 120.0
    ) -> keybroker_pb2.ReconcileResponse:
        """Compare OpenRouter's keys with the broker's and repair (admin)."""
        request = messages.reconcile_request(dry_run=dry_run)
        return await self._call(
            "KeyBrokerAdmin", "Reconcile", request, keybroker_pb2.ReconcileResponse, timeout
        )

    async def rotate_keys(
        self,
        *,
        older_than: datetime.timedelta = datetime.timedelta(0),
        grace_period: datetime.timedelta = datetime.timedelta(0),
        delete_old: bool = False,
        dry_run: bool = False,
        timeout: float | None = 300.0,
    ) -> keybroker_pb2.RotateKeysResponse:
        """Rotate every active key older than `older_than` (0: all), each with a grace (admin)."""
        request = messages.rotate_keys_request(
            older_than=older_than, grace_period=grace_period, delete_old=delete_old, dry_run=dry_run
        )
        return await self._call(
            "KeyBrokerAdmin", "RotateKeys", request, keybroker_pb2.RotateKeysResponse, timeout
        )

    async def list_keys(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> keybroker_pb2.ListKeysResponse:
        """One page of key metadata, ordered by user id; never a secret."""
        request = messages.list_keys_request(page_size=page_size, page_token=page_token)
        return await self._call(
            "KeyBrokerAdmin", "ListKeys", request, keybroker_pb2.ListKeysResponse, timeout
        )

    async def iter_keys(
        self, page_size: int = 100, *, timeout: float | None = None
    ) -> AsyncIterator[keybroker_pb2.KeyInfo]:
        """Every user's key metadata, fetched page by page (``timeout`` applies per page)."""
        page_token = ""
        while True:
            page = await self.list_keys(page_size=page_size, page_token=page_token, timeout=timeout)
            for key in page.keys:
                yield key
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    async def list_alerts(
        self,
        *,
        user_id: str | None = None,
        kind: str | int | None = None,
        undelivered_only: bool = False,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> keybroker_pb2.ListAlertsResponse:
        """One page of usage alerts, newest first, with their delivery state (admin). ``kind`` is
        "threshold", "anomaly" or an ``AlertKind`` value; ``None`` lists every kind."""
        request = keybroker_pb2.ListAlertsRequest(
            user_id=user_id or "",
            kind=_alert_kind(kind),
            undelivered_only=undelivered_only,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._call(
            "KeyBrokerAdmin", "ListAlerts", request, keybroker_pb2.ListAlertsResponse, timeout
        )

    async def iter_alerts(
        self,
        *,
        user_id: str | None = None,
        kind: str | int | None = None,
        undelivered_only: bool = False,
        page_size: int = 100,
        timeout: float | None = None,
    ) -> AsyncIterator[keybroker_pb2.Alert]:
        """Every matching alert, newest first, fetched page by page (``timeout`` applies per page)."""
        page_token = ""
        while True:
            page = await self.list_alerts(
                user_id=user_id,
                kind=kind,
                undelivered_only=undelivered_only,
                page_size=page_size,
                page_token=page_token,
                timeout=timeout,
            )
            for alert in page.alerts:
                yield alert
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    async def get_usage_summary(
        self, user_id: str, *, month: str | datetime.date | None = None, timeout: float | None = None
    ) -> keybroker_pb2.GetUsageSummaryResponse:
        """Totals and per-model/per-agent breakdowns for a month ("YYYY-MM"; default: this month)."""
        request = messages.get_usage_summary_request(user_id, month=month)
        return await self._call(
            "KeyBrokerAdmin", "GetUsageSummary", request, keybroker_pb2.GetUsageSummaryResponse, timeout
        )

    async def get_cost_report(
        self,
        kind: str | int,
        date: str | datetime.date | None = None,
        month: str | datetime.date | None = None,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = 60.0,
    ) -> keybroker_pb2.GetCostReportResponse:
        """A cost report (admin): ``kind`` "daily" (per user and model for one UTC day, ``date``
        "YYYY-MM-DD", default today) or "monthly" (per user against the limit, ``month`` "YYYY-MM",
        default this month). ``page_size`` 0 returns the whole report at once (past ~30,000 rows
        that outgrows gRPC's default 4 MB receive limit); otherwise one page, continued with the
        reply's ``next_page_token``. ``fetch_cost_report`` does the paging."""
        request = messages.cost_report_request(
            kind, date=date, month=month, page_size=page_size, page_token=page_token
        )
        return await self._call(
            "KeyBrokerAdmin", "GetCostReport", request, keybroker_pb2.GetCostReportResponse, timeout
        )

    async def fetch_cost_report(
        self,
        kind: str | int,
        date: str | datetime.date | None = None,
        month: str | datetime.date | None = None,
        *,
        page_size: int = 5000,
        timeout: float | None = 60.0,
    ) -> keybroker_pb2.GetCostReportResponse:
        """The whole report, fetched page by page (``timeout`` applies per page) and returned as
        one response: the rows of every page in order, the period, and the total of the last
        page read."""
        whole = keybroker_pb2.GetCostReportResponse()
        page_token = ""
        while True:
            page = await self.get_cost_report(
                kind, date, month, page_size=page_size, page_token=page_token, timeout=timeout
            )
            whole.daily.extend(page.daily)
            whole.monthly.extend(page.monthly)
            whole.period, whole.total_cost_usd = page.period, page.total_cost_usd
            if not page.next_page_token:
                return whole
            page_token = page.next_page_token

    # -- Key cache and the OpenRouter call ---------------------------------------------------

    async def get_key_cached(
        self, user_id: str, current_version: int | None = None, *, timeout: float | None = None
    ) -> keybroker_pb2.GetKeyResponse:
        """The cached key, fetched with GetKey when missing, invalidated or not ``current_version``."""
        cached = self._keys.get(user_id, current_version)
        if cached is not None:
            return cached
        async with self._keys.fetching(user_id):
            # Another task may have fetched it while this one waited.
            cached = self._keys.get(user_id, current_version)
            if cached is not None:
                return cached
            generation = self._keys.generation(user_id)
            key = await self.get_key(user_id, timeout=timeout)
            self._keys.put(user_id, key, generation)
            return key

    def invalidate_key(self, user_id: str) -> None:
        """Forget the cached key, so the next ``get_key_cached`` calls GetKey."""
        self._keys.invalidate(user_id)

    async def openrouter_chat(
        self,
        user_id: str,
        payload: Mapping[str, Any],
        *,
        agent: str = "",
        openrouter_base_url: str = "https://openrouter.ai/api/v1",
        http_client: httpx.AsyncClient | None = None,
        estimator: CostEstimator | None = None,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """One budgeted chat completion with the user's key: reserve, call, record (see ``chat``)."""
        return await openrouter_chat(
            self,
            user_id,
            payload,
            agent=agent,
            openrouter_base_url=openrouter_base_url,
            http_client=http_client if http_client is not None else self._http_client(),
            estimator=estimator,
            timeout=timeout,
        )

    # -- Plumbing ----------------------------------------------------------------------------

    def _rpc(
        self, service: str, method: str, response_type: type[Message], *, streaming: bool = False
    ) -> _Rpc:
        """The multicallable of ``/keybroker.v1.{service}/{method}``, made once per method
        (``streaming``: a server-streaming RPC, whose call is iterated rather than awaited)."""
        path = method_path(service, method)
        rpc = self._rpcs.get(path)
        if rpc is None:
            if self._channel is None:
                self._channel = self._open_channel()
            factory = self._channel.unary_stream if streaming else self._channel.unary_unary
            rpc = factory(
                path,
                request_serializer=_serialize,
                response_deserializer=response_type.FromString,
            )
            self._rpcs[path] = rpc
        return rpc

    def _open_channel(self) -> Any:
        if self._credentials is not None:
            return grpc.aio.secure_channel(self._target, self._credentials, options=self._channel_options)
        return grpc.aio.insecure_channel(self._target, options=self._channel_options)

    def _http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient()
        return self._http

    async def _call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[_Response],
        timeout: float | None,
    ) -> _Response:
        """Invoke one unary RPC with the token and a deadline; translate its failure."""
        rpc = self._rpc(service, method, response_type)
        try:
            response = await rpc(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as err:
            error = from_rpc_error(err, secrets=(self._token,))
            # Keep the gRPC error as the cause for debugging, unless it could reveal the token.
            raise error from (None if self._token in repr(err) else err)
        if not isinstance(response, response_type):
            raise TypeError(f"unexpected response type {type(response).__name__}")
        return response


def method_path(service: str, method: str) -> str:
    """The gRPC path of an RPC of the contract, e.g. ``/keybroker.v1.KeyBroker/GetKey``.

    Raises ``KeyError`` for a name the contract does not define.
    """
    descriptor = keybroker_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    return f"/{descriptor.containing_service.full_name}/{descriptor.name}"


def _alert_kind(kind: str | int | None) -> keybroker_pb2.AlertKind.ValueType:
    """``"threshold"``/``"anomaly"`` (any case, with or without the ``ALERT_KIND_`` prefix) or
    an ``AlertKind`` number; ``None`` is ``ALERT_KIND_UNSPECIFIED`` (no filter)."""
    if kind is None:
        return keybroker_pb2.ALERT_KIND_UNSPECIFIED
    if isinstance(kind, int):
        return keybroker_pb2.AlertKind.ValueType(kind)
    name = kind.upper()
    try:
        return keybroker_pb2.AlertKind.Value(name if name.startswith("ALERT_KIND_") else f"ALERT_KIND_{name}")
    except ValueError:
        raise ValueError(f"not an alert kind: {kind!r} (use 'threshold' or 'anomaly')") from None


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
