"""Prometheus metrics (prometheus-client), served on KEYBROKER_METRICS_LISTEN.

Each runtime owns its registry, so several brokers in one process (tests) do not collide. Labels
are bounded: RPC method, status code, model, provider endpoint, task name — never a user id.
Money is counted in integer micro-dollars (rounded half-even) so that no binary float ever holds
an amount; the ledger stays the exact source of truth, these are for dashboards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, Decimal
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("keybroker.metrics")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MICRO = Decimal("0.000001")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_requests = Counter(
            "keybroker_rpc_requests",
            "RPCs served, by method and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        self.rpc_duration = Histogram(
            "keybroker_rpc_duration_seconds", "RPC latency in the server", ["method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.spend = Counter(
            "keybroker_spend_micro_usd",
            "Spend recorded by RecordUsage in millionths of a US dollar, by model",
            ["model"],
            registry=r,
        )
        self.open_reservations = Gauge(
            "keybroker_open_reservations",
            "Open CheckLimit reservations (set by the replica leading reservation expiry)",
            registry=r,
        )
        self.provider_duration = Histogram(
            "keybroker_provider_request_duration_seconds", "OpenRouter key-management call latency",
            ["endpoint", "method"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.provider_errors = Counter(
            "keybroker_provider_errors", "Failed OpenRouter calls, by endpoint and error reason",
            ["endpoint", "reason"], registry=r,
        )  # fmt: skip
        self.pool_in_use = Gauge("keybroker_db_pool_in_use", "Database connections in use", registry=r)
        self.pool_idle = Gauge("keybroker_db_pool_idle", "Idle database connections in the pool", registry=r)
        self.background_runs = Counter(
            "keybroker_background_runs", "Background task runs on this replica", ["task"], registry=r
        )
        self.background_failures = Counter(
            "keybroker_background_failures",
            "Failed background task runs on this replica",
            ["task"],
            registry=r,
        )
        self.alerts_pending = Gauge(
            "keybroker_alerts_pending", "Alerts not yet delivered to every webhook", registry=r
        )
        self.alerts_delivered = Counter(
            "keybroker_alerts_delivered", "Alerts delivered to every webhook", registry=r
        )
        self._server: WSGIServer | None = None
        self.port = 0

    # -- hooks the other parts call -------------------------------------------------------------

    def observe_rpc(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.rpc_requests.labels(method, code.name).inc()
        self.rpc_duration.labels(method).observe(seconds)

    def record_spend(self, model: str, cost_usd: Decimal) -> None:
        micro = int((cost_usd / MICRO).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
        self.spend.labels(model or "unknown").inc(micro)

    def observe_provider(self, endpoint: str, method: str, seconds: float, error: str | None) -> None:
        self.provider_duration.labels(endpoint, method).observe(seconds)
        if error is not None:
            self.provider_errors.labels(endpoint, error).inc()

    def observe_task(self, task: str, failed: bool) -> None:
        (self.background_failures if failed else self.background_runs).labels(task).inc()

    def observe_alerts(self, delivered: int, pending: int) -> None:
        self.alerts_delivered.inc(delivered)
        self.alerts_pending.set(pending)

    def watch_pool(self, in_use: Callable[[], int], idle: Callable[[], int]) -> None:
        self.pool_in_use.set_function(in_use)
        self.pool_idle.set_function(idle)

    # -- the endpoint ---------------------------------------------------------------------------

    def serve(self, listen: str) -> int:
        """Serve /metrics on HOST:PORT in a thread (prometheus-client's server); returns the port,
        or 0 when it could not listen (logged: the broker keeps serving without metrics)."""
        host, _, port = listen.rpartition(":")
        try:
            server, _thread = start_http_server(
                int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry
            )
        except OSError as exc:  # metrics must never take the broker down
            log.error("metrics endpoint %s not started: %s", listen, exc.strerror or exc)
            return 0
        self._server = server
        bound = self.port = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", host or "127.0.0.1", bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
