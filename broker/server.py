"""The gRPC server: servicers, health, reflection, error translation, graceful shutdown."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from broker.admin_service import KeyBrokerAdminService
from broker.auth import AuthInterceptor, TokenAuthority, current_caller
from broker.background import BackgroundTasks
from broker.errors import KeybrokerError, to_rpc_status
from broker.events import KeyEventHub
from broker.key_reports import KeyReports
from broker.keys import KeyService
from broker.ledger import Ledger
from broker.logs import scrub
from broker.reconcile import Reconciler
from broker.service import KeyBrokerService
from broker.tls import is_loopback
from broker.user_binding import UserBinding, UserBindingInterceptor

log = logging.getLogger("keybroker.rpc")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["KeyBroker"].full_name,
    pb.DESCRIPTOR.services_by_name["KeyBrokerAdmin"].full_name,
)
STATUS_DETAILS_KEY = "grpc-status-details-bin"
MAX_MESSAGE_BYTES = 1 << 20
# The server's channel options; bench/noop_server.py builds its server with these too, so the
# no-op ceiling cannot drift from the broker. SO_REUSEPORT is off by default (gRPC turns it on):
# a second broker started by mistake on a busy port then fails instead of silently sharing it.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
)


def server_options(*, reuse_port: bool = False) -> list[tuple[str, int]]:
    """SERVER_OPTIONS, with SO_REUSEPORT on for the workers of `keybroker serve --workers N`."""
    return [
        (name, int(reuse_port) if name == "grpc.so_reuseport" else value) for name, value in SERVER_OPTIONS
    ]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The one place where domain errors become gRPC statuses with rich details; anything else
    is a bug: logged with its stack, answered INTERNAL without detail. Also logs each call."""

    def __init__(self, observe: CallObserver | None = None) -> None:
        self.observe = observe

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        observe = self.observe
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_guard_call(handler.unary_unary, method, observe))
        if handler.unary_stream is None:
            return handler
        if inspect.iscoroutinefunction(handler.unary_stream):  # streams with context.write()
            return handler._replace(unary_stream=_guard_call(handler.unary_stream, method, observe))
        return handler._replace(unary_stream=_guard_stream(handler.unary_stream, method, observe))


# Told of every finished call: (method, status code, seconds). The metrics use it.
CallObserver = Callable[[str, grpc.StatusCode, float], None]


Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _guard_call(inner: Behavior, method: str, observe: CallObserver | None) -> Behavior:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await inner(request, context)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:
            code = _code_of(error, context)
            await _abort(error, context, method)
        finally:
            _log_call(method, code, started, request, observe)

    return guarded


StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


def _guard_stream(inner: StreamBehavior, method: str, observe: CallObserver | None) -> StreamBehavior:
    """The async-generator twin of `_guard_call`: same translation, logged when the stream ends."""

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            async for item in inner(request, context):
                yield item
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the caller went away
            raise
        except Exception as error:
            code = _code_of(error, context)
            await _abort(error, context, method)
        finally:
            _log_call(method, code, started, request, observe)

    return guarded


def _code_of(error: Exception, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    if isinstance(error, KeybrokerError):
        return error.code
    code: grpc.StatusCode | None = context.code()
    return code if code not in (None, grpc.StatusCode.OK) else grpc.StatusCode.INTERNAL


async def _abort(error: Exception, context: grpc.aio.ServicerContext, method: str) -> NoReturn:
    """End the call for `error`: a domain error with its rich status, an abort already in
    flight as it is, anything else as INTERNAL (a bug: logged with its stack)."""
    if isinstance(error, KeybrokerError):
        status = to_rpc_status(error)
        await context.abort(
            status.code,
            status.message,
            trailing_metadata=((STATUS_DETAILS_KEY, status.details.SerializeToString()),),
        )
    if context.code() not in (None, grpc.StatusCode.OK):
        raise error
    log.exception("bug while serving %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("context.abort returned")


def _log_call(
    method: str, code: grpc.StatusCode, started: float, request: Any, observe: CallObserver | None
) -> None:
    elapsed = time.perf_counter() - started
    if observe is not None:
        observe(method, code, elapsed)
    if not log.isEnabledFor(logging.INFO):
        return  # the common case in production: no per-call work beyond the metrics
    caller = current_caller.get()
    log.info(
        "rpc %s %s %.1fms",
        method,
        code.name,
        elapsed * 1000,
        extra={
            "rpc": method,
            "status": code.name,
            "duration_ms": round(elapsed * 1000, 3),
            "caller": caller.name if caller else None,
            # Caller-supplied text: scrubbed, in case a client put a secret where it does not belong.
            "user_id": scrub(getattr(request, "user_id", None) or "") or None,
            "request_id": scrub(getattr(request, "request_id", None) or "") or None,
        },
    )


class BrokerServer:
    """A grpc.aio server with the broker's services; `port` is the bound port."""

    def __init__(
        self,
        keys: KeyService,
        ledger: Ledger,
        authority: TokenAuthority,
        events: KeyEventHub,
        reports: KeyReports,
        reconciler: Reconciler,
        user_binding: UserBinding | None = None,
        *,
        reuse_port: bool = False,
        call_observer: CallObserver | None = None,
    ) -> None:
        self.events = events
        # Outermost first: errors become statuses, then the caller token, then (when configured)
        # the end user's JWT for GetKey and CheckLimit.
        interceptors: list[grpc.aio.ServerInterceptor] = [
            ErrorInterceptor(call_observer),
            AuthInterceptor(authority),
        ]
        if user_binding is not None:
            interceptors.append(UserBindingInterceptor(user_binding))
        options = server_options(reuse_port=reuse_port)
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_KeyBrokerServicer_to_server(KeyBrokerService(keys, ledger, events, reports), self.server)
        pb_grpc.add_KeyBrokerAdminServicer_to_server(
            KeyBrokerAdminService(keys, ledger, reconciler), self.server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0
        # The replica's background tasks, once started (tests count their runs).
        self.background: BackgroundTasks | None = None

    async def start(self, listen: str, credentials: grpc.ServerCredentials | None = None) -> int:
        """Listen on `listen`: TLS with `credentials` (see broker/tls.py), else plaintext."""
        if credentials is not None:
            self.port = self.server.add_secure_port(listen, credentials)
        else:
            if not is_loopback(listen):
                logging.getLogger("keybroker").warning(
                    "listening on %s WITHOUT TLS: tokens and keys cross the network in plaintext; "
                    "set KEYBROKER_TLS_CERT and KEYBROKER_TLS_KEY (or listen on 127.0.0.1)",
                    listen,
                )
            self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        await self.server.start()
        await self.set_serving(True)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Drain: health turns NOT_SERVING, new calls are refused, in-flight calls finish.
        WatchKeys streams would never finish by themselves: they end at once (callers resubscribe)."""
        await self.set_serving(False)
        self.events.drain()
        await self.server.stop(grace)

    async def wait(self) -> None:
        await self.server.wait_for_termination()
