"""Caller tokens and scopes, and the gRPC interceptor that enforces them.

A token looks like kbt_<id>_<secret>. Only SHA-256(secret) is stored; the id finds the row and the
hash is compared in constant time. Scope "agent" reaches the KeyBroker service, "admin" everything.
Health and reflection need no token (load balancers and grpcurl's `list` use them).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from broker.clock import Clock
from broker.db import Database
from broker.errors import InvalidArgument, PermissionDenied, Unauthenticated
from broker.storage import tokens_store

SCOPES = ("agent", "admin")
TOKEN = re.compile(r"^kbt_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
PUBLIC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
SERVICE_SCOPES = {
    "/keybroker.v1.KeyBroker/": ("agent", "admin"),
    "/keybroker.v1.KeyBrokerAdmin/": ("admin",),
}


@dataclass(frozen=True)
class Caller:
    name: str
    scope: str


# The authenticated caller of the RPC being served (set by the interceptor's wrapper).
current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("current_caller", default=None)


@dataclass(frozen=True)
class IssuedToken:
    token_id: str
    token: str  # shown once, never stored


def new_token() -> IssuedToken:
    token_id = secrets.token_hex(8)
    return IssuedToken(token_id, f"kbt_{token_id}_{secrets.token_urlsafe(32)}")


def secret_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


class TokenAuthority:
    """Creates, checks and revokes caller tokens; caches lookups for `cache_seconds`."""

    def __init__(self, db: Database, clock: Clock, cache_seconds: float = 5.0) -> None:
        self.db = db
        self.clock = clock
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, tokens_store.TokenRow | None]] = {}

    async def create(self, name: str, scope: str, actor: str) -> IssuedToken:
        if scope not in SCOPES:
            raise InvalidArgument("scope", "must be agent or admin")
        if not re.fullmatch(r"[A-Za-z0-9._:@-]{1,64}", name):
            raise InvalidArgument("name", "must be 1-64 characters of A-Z a-z 0-9 . _ : @ -")
        issued = new_token()
        await tokens_store.insert_token(
            self.db, issued.token_id, name, scope, secret_hash(issued.token), self.clock(), actor
        )
        return issued

    async def revoke(self, name: str, actor: str) -> bool:
        revoked = await tokens_store.revoke_token(self.db, name, self.clock(), actor)
        self._cache.clear()
        return revoked

    async def authenticate(self, authorization: str | None) -> Caller:
        if not authorization:
            raise Unauthenticated("missing authorization metadata (Bearer token)")
        scheme, _, token = authorization.partition(" ")
        match = TOKEN.fullmatch(token.strip()) if scheme.lower() == "bearer" else None
        if match is None:
            raise Unauthenticated("malformed authorization metadata: use 'Bearer <token>'")
        row = await self._lookup(match.group(1))
        valid = row is not None and row.revoke_time is None
        # Compare even for unknown ids so timing does not tell which ids exist.
        expected = row.secret_hash if row is not None else b"\0" * 32
        if not hmac.compare_digest(expected, secret_hash(token.strip())) or not valid:
            raise Unauthenticated("unknown or revoked token")
        assert row is not None
        return Caller(row.name, row.scope)

    async def _lookup(self, token_id: str) -> tokens_store.TokenRow | None:
        now = time.monotonic()
        cached = self._cache.get(token_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        row = await tokens_store.find_token(self.db, token_id)
        if self.cache_seconds > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[token_id] = (now + self.cache_seconds, row)
        return row


def required_scopes(method: str) -> tuple[str, ...] | None:
    """Scopes that may call `method`; None for public services."""
    if method.startswith(PUBLIC_SERVICES):
        return None
    for prefix, scopes in SERVICE_SCOPES.items():
        if method.startswith(prefix):
            return scopes
    return ("admin",)


Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token and scope before the servicer runs; sets `current_caller`."""

    def __init__(self, authority: TokenAuthority) -> None:
        self.authority = authority

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        scopes = required_scopes(handler_call_details.method)
        if handler is None or scopes is None:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        authorization = metadata.get("authorization")

        async def check() -> Caller:
            caller = await self.authority.authenticate(
                authorization if isinstance(authorization, str) else None
            )
            if caller.scope not in scopes:
                raise PermissionDenied(f"the token's scope {caller.scope!r} does not allow this RPC")
            current_caller.set(caller)
            return caller

        return wrap_handler(handler, check)


def wrap_handler(
    handler: grpc.RpcMethodHandler, before: Callable[[], Awaitable[object]]
) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behaviour first awaits `before()` (unary and server-streaming)."""
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await before()
            return await inner(request, context)

        return handler._replace(unary_unary=unary)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await before()
            async for item in inner_stream(request, context):
                yield item

        return handler._replace(unary_stream=stream)
    return handler
