"""A no-op KeyBroker server: the ceiling the broker is measured against.

Built like broker/server.py builds the broker's server (grpc.aio.server with the same options, the
generated add_*_to_server registration, health, reflection, add_insecure_port on the same kind of
address, the same event loop), but every unary method answers at once with a fixed response of the
right type. No interceptors, no database: what is left is the cost of gRPC itself in Python.

Run as its own process:  python -m bench.noop_server --listen 127.0.0.1:0
It prints "noop listening on port N" on stdout and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from broker.server import server_options  # the broker's own options: the two cannot drift

SERVICES = ("KeyBroker", "KeyBrokerAdmin")

_PERIOD_END = Timestamp(seconds=1_790_000_000)
_EXPIRES = Timestamp(seconds=1_780_000_900)


def fixed_responses() -> dict[str, message.Message]:
    """Responses shaped like the broker's (same fields set, similar sizes); others are empty."""
    return {
        "GetKeyResponse": pb.GetKeyResponse(
            api_key="sk-or-v1-" + "0123456789abcdef" * 4,
            key_id="0123456789abcdef" * 4,
            key_version=1,
            limit_usd="1000000",
            spent_usd="0.012345",
            remaining_usd="999999.987655",
        ),
        "CheckLimitResponse": pb.CheckLimitResponse(
            allowed=True,
            limit_usd="1000000",
            spent_usd="0.012345",
            reserved_usd="0.000001",
            remaining_usd="999999.987654",
            period_end_time=_PERIOD_END,
            reservation_id="4f6c8a52-3f1e-4d1b-9a54-0c2b8e9f7d10",
            reservation_expire_time=_EXPIRES,
            key_version=1,
        ),
        "RecordUsageResponse": pb.RecordUsageResponse(
            spent_usd="0.012346", remaining_usd="999999.987654", over_limit=False
        ),
        "ReleaseReservationResponse": pb.ReleaseReservationResponse(released=True, reserved_usd="0"),
        "GetUsageSummaryResponse": pb.GetUsageSummaryResponse(
            total_requests=10, total_tokens=1500, total_cost_usd="0.0123", month="2026-01"
        ),
    }


def _answer(reply: message.Message, delay: float) -> Callable[..., Awaitable[message.Message]]:
    if delay > 0:

        async def later(self: Any, request: message.Message, context: grpc.aio.ServicerContext) -> Any:
            await asyncio.sleep(delay)
            return reply

        return later

    async def method(self: Any, request: message.Message, context: grpc.aio.ServicerContext) -> Any:
        return reply

    return method


def noop_servicer(base: type, service_name: str, delay: float = 0.0) -> Any:
    """An instance of the generated servicer base with every unary method answering at once (or
    after `delay` seconds on a timer)."""
    replies = fixed_responses()
    methods: dict[str, Any] = {}
    for method in pb.DESCRIPTOR.services_by_name[service_name].methods:
        if method.client_streaming or method.server_streaming:
            continue  # streams keep the base class's UNIMPLEMENTED
        output = method.output_type.name
        reply = replies.get(output) or getattr(pb, output)()
        methods[method.name] = _answer(reply, delay)
    return type(f"Noop{service_name}", (base,), methods)()


class PassThroughInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps each unary handler per call, as the broker's interceptors do (for `--interceptors`:
    measures what that plumbing alone costs)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await inner(request, context)

        return handler._replace(unary_unary=wrapped)


def build_server(
    interceptors: int = 0, delay: float = 0.0
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    server = grpc.aio.server(
        interceptors=[PassThroughInterceptor() for _ in range(interceptors)], options=server_options()
    )
    pb_grpc.add_KeyBrokerServicer_to_server(
        noop_servicer(pb_grpc.KeyBrokerServicer, "KeyBroker", delay), server
    )
    pb_grpc.add_KeyBrokerAdminServicer_to_server(
        noop_servicer(pb_grpc.KeyBrokerAdminServicer, "KeyBrokerAdmin", delay), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(pb.DESCRIPTOR.services_by_name[name].full_name for name in SERVICES)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return server, health_servicer


async def serve(listen: str, interceptors: int = 0, delay: float = 0.0) -> None:
    server, health_servicer = build_server(interceptors, delay)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"noop listening on port {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noop_server", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default 127.0.0.1:0)")
    parser.add_argument(
        "--interceptors", type=int, default=0, help="pass-through interceptors to add (default 0)"
    )
    parser.add_argument(
        "--answer-delay-ms",
        type=float,
        default=0.0,
        help="answer after this many ms on a timer (default 0: at once); shows what waiting costs",
    )
    args = parser.parse_args(argv)
    if not args.listen.startswith("127.0.0.1:"):
        parser.error("the benchmark only listens on 127.0.0.1")
    try:
        import uvloop  # the broker's `serve` runs on uvloop too: same loop, fair comparison
    except ImportError:
        asyncio.run(serve(args.listen, args.interceptors, args.answer_delay_ms / 1000))
    else:
        uvloop.run(serve(args.listen, args.interceptors, args.answer_delay_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
