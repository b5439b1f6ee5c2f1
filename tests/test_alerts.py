"""Usage alerts: fired exactly once per (user, month, threshold) by RecordUsage itself, delivered
at least once to real HTTP webhooks (with retries and backoff), anomaly alerts once per hour, and
ListAlerts / `keybroker alerts list`. Webhook URLs are secrets: never in logs or in the API."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from keybroker.v1 import keybroker_pb2 as pb

from broker.alerts import AlertDispatcher, backoff_delay, webhook_id
from broker.clock import month_label, period_end, period_start
from broker.config import ConfigError
from broker.crypto import generate_master_key
from broker.sandbox import Sandbox
from tests.conftest import Broker, TestClock
from tests.helpers import assert_invalid_argument, assert_rpc_error, eventually, running_broker

FAST = {"backoff_base": timedelta(milliseconds=10), "backoff_cap": timedelta(milliseconds=40)}
# Any spend above the floor in a user's first hour is far above their (zero) hourly average: threshold
# tests whose broker detects anomalies at start-up turn anomalies off, to count threshold alerts only.
NO_ANOMALIES: dict[str, Any] = {"anomaly_floor_usd": Decimal(10**9)}
THRESHOLD = pb.ALERT_KIND_THRESHOLD


class Receiver:
    """A webhook receiver on 127.0.0.1 over real HTTP. Its URL carries a secret path, like a Slack
    incoming webhook; the first `fail_first` requests are answered 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.secret = "T0-" + secrets.token_urlsafe(18)
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []  # every POST: headers, body
        self.accepted: list[dict[str, Any]] = []  # bodies answered 2xx
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post(f"/services/{self.secret}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)  # an access log would print the secret path
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/services/{self.secret}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(({k.lower(): v for k, v in request.headers.items()}, body))
        if len(self.requests) <= self.fail_first:
            return web.Response(status=500, text="failing on purpose")
        self.accepted.append(body)
        return web.Response(text="ok")


StartReceiver = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def receivers() -> AsyncIterator[StartReceiver]:
    started: list[Receiver] = []

    async def start(fail_first: int = 0) -> Receiver:
        receiver = Receiver(fail_first)
        await receiver.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.stop()


async def record(broker: Broker, user_id: str, request_id: str, cost: str) -> pb.RecordUsageResponse:
    return await broker.agent.RecordUsage(
        pb.RecordUsageRequest(user_id=user_id, request_id=request_id, cost_usd=cost, model="m/one"),
        metadata=broker.as_agent(),
        timeout=30,
    )


async def list_alerts(broker: Broker, **filters: Any) -> list[pb.Alert]:
    reply = await broker.admin.ListAlerts(
        pb.ListAlertsRequest(**filters), metadata=broker.as_admin(), timeout=10
    )
    return list(reply.alerts)


async def outbox(broker: Broker, kind: str = "THRESHOLD") -> list[dict[str, Any]]:
    rows = await broker.runtime.db.fetch(
        "SELECT * FROM alerts WHERE kind = $1 ORDER BY create_time, dedup_key", kind
    )
    return [dict(row) for row in rows]


async def deliveries(broker: Broker) -> int:
    count: int = await broker.runtime.db.fetchval("SELECT count(*) FROM alert_deliveries")
    return count


def this_month(clock: TestClock) -> str:
    return month_label(period_start(clock()))


async def all_delivered(broker: Broker) -> bool:
    return not await list_alerts(broker, undelivered_only=True)


# --- exactly once --------------------------------------------------------------------------------


async def test_80_and_100_percent_fire_once_each_with_their_figures(
    database_url: str, sandbox: Sandbox, clock: TestClock, tmp_path: Path, receivers: StartReceiver
) -> None:
    hook = await receivers()
    async with running_broker(
        database_url, sandbox, tmp_path, clock, alert_webhooks=(hook.url,), **NO_ANOMALIES
    ) as broker:
        await broker.provision("alice", limit="10")
        await record(broker, "alice", "g-1", "7")
        assert await outbox(broker) == [], "70 % crosses nothing"

        crossing = await record(broker, "alice", "g-2", "1.5")
        assert crossing.spent_usd == "8.5" and not crossing.duplicate
        retries = await asyncio.gather(*(record(broker, "alice", "g-2", "1.5") for _ in range(50)))
        assert all(r.duplicate and r.spent_usd == "8.5" for r in retries)
        [eighty] = await outbox(broker)
        assert (eighty["kind"], eighty["threshold_percent"], eighty["dedup_key"]) == (
            "THRESHOLD",
            80,
            "threshold:80",
        )
        assert (eighty["spent_usd"], eighty["reference_usd"]) == (Decimal("8.5"), Decimal(10))

        await record(broker, "alice", "g-3", "2")
        await record(broker, "alice", "g-4", "1")  # past 100 %: nothing new
        newest, oldest = await list_alerts(broker, user_id="alice", kind=THRESHOLD)
        assert (newest.threshold_percent, newest.spent_usd, newest.reference_usd) == (100, "10.5", "10")
        assert (oldest.threshold_percent, oldest.spent_usd) == (80, "8.5")
        assert {newest.month, oldest.month} == {this_month(clock)}
        assert newest.kind == oldest.kind == pb.ALERT_KIND_THRESHOLD

        # Delivered by the broker's own background dispatcher.
        await eventually(lambda: all_delivered(broker))
        assert len(hook.requests) == 2
        by_id = {body["alert_id"]: (headers, body) for headers, body in hook.requests}
        assert set(by_id) == {newest.alert_id, oldest.alert_id}
        headers, body = by_id[oldest.alert_id]
        assert headers["idempotency-key"] == oldest.alert_id
        assert headers["content-type"] == "application/json"
        assert body["kind"] == "THRESHOLD" and body["user_id"] == "alice"
        assert body["threshold_percent"] == 80 and body["month"] == this_month(clock)
        assert body["spent_usd"] == "8.5" and body["reference_usd"] == "10"
        assert datetime.fromisoformat(body["create_time"]) == oldest.create_time.ToDatetime(UTC)
        assert isinstance(body["text"], str) and "\n" not in body["text"]
        assert "alice" in body["text"] and "80%" in body["text"] and "$8.5" in body["text"]
        for alert in await list_alerts(broker, kind=THRESHOLD):
            assert alert.HasField("deliver_time") and alert.attempts == 1 and alert.last_error == ""
        assert await deliveries(broker) == 2
        assert await broker.runtime.alerts.dispatcher.dispatch_due() == 0
        assert len(hook.requests) == 2, "a delivered alert is not sent again"


async def test_100_concurrent_usages_crossing_together_fire_one_alert(broker: Broker) -> None:
    await broker.provision("bob", limit="10")
    replies = await asyncio.gather(*(record(broker, "bob", f"c-{i}", "0.09") for i in range(100)))
    assert sorted(Decimal(r.spent_usd) for r in replies)[-1] == Decimal(9)
    [alert] = await outbox(broker)
    # The usage that crossed 80 % took the spend from 7.92 to 8.01: that is the figure recorded.
    assert alert["threshold_percent"] == 80 and alert["spent_usd"] == Decimal("8.01")


async def test_two_replicas_recording_for_one_user_fire_once(
    database_url: str, sandbox: Sandbox, clock: TestClock, tmp_path: Path, receivers: StartReceiver
) -> None:
    hook = await receivers()
    options = {"master_key": generate_master_key(), "alert_webhooks": (hook.url,), **NO_ANOMALIES}
    async with (
        running_broker(database_url, sandbox, tmp_path, clock, **options) as first,
        running_broker(database_url, sandbox, tmp_path, clock, **options) as second,
    ):
        await first.provision("carol", limit="10")
        await asyncio.gather(
            *(record((first, second)[i % 2], "carol", f"r-{i}", "0.25") for i in range(60))
        )  # 15 USD: both 80 % and 100 % are crossed, by whichever replica got there
        alerts = await list_alerts(second, user_id="carol", kind=THRESHOLD)
        assert sorted(a.threshold_percent for a in alerts) == [80, 100]
        await eventually(lambda: all_delivered(first))
        assert await first.runtime.alerts.dispatcher.dispatch_due() == 0
        assert await second.runtime.alerts.dispatcher.dispatch_due() == 0
        assert sorted(body["threshold_percent"] for _, body in hook.requests) == [80, 100]


async def test_a_restart_fires_nothing_again_and_a_new_month_fires_again(
    database_url: str, sandbox: Sandbox, clock: TestClock, tmp_path: Path, receivers: StartReceiver
) -> None:
    hook = await receivers()
    options = {"master_key": generate_master_key(), "alert_webhooks": (hook.url,), **NO_ANOMALIES}
    async with running_broker(database_url, sandbox, tmp_path, clock, **options) as before:
        await before.provision("dave", limit="10")
        await record(before, "dave", "d-1", "8")
        await eventually(lambda: all_delivered(before))

    async with running_broker(database_url, sandbox, tmp_path, clock, **options) as after:
        assert (await record(after, "dave", "d-1", "8")).duplicate
        await record(after, "dave", "d-2", "1")  # 9 USD: still between 80 % and 100 %
        assert [a.threshold_percent for a in await list_alerts(after)] == [80]
        assert await after.runtime.alerts.dispatcher.dispatch_due() == 0
        assert len(hook.requests) == 1

        now = clock()
        clock.offset += period_end(period_start(now)) + timedelta(hours=1) - now
        assert (await record(after, "dave", "d-3", "0.5")).spent_usd == "0.5", "a new month starts at zero"
        await record(after, "dave", "d-4", "7.5")
        newest, oldest = await list_alerts(after, user_id="dave", kind=THRESHOLD)
        assert (newest.threshold_percent, newest.month) == (80, this_month(clock))
        assert newest.month != oldest.month and newest.spent_usd == "8"
        await eventually(lambda: all_delivered(after))
        assert [body["month"] for _, body in hook.requests] == [oldest.month, newest.month]


# --- delivery ------------------------------------------------------------------------------------


async def test_a_failing_receiver_gets_the_alert_eventually_and_once_recorded(
    broker: Broker, clock: TestClock, receivers: StartReceiver
) -> None:
    hook = await receivers(fail_first=3)
    slow = AlertDispatcher(broker.runtime.db, clock, [hook.url], backoff_base=timedelta(hours=1))
    dispatcher = AlertDispatcher(broker.runtime.db, clock, [hook.url], **FAST)
    try:
        await broker.provision("erin", limit="10")
        await record(broker, "erin", "e-1", "9")

        assert await slow.dispatch_due() == 0
        [alert] = await list_alerts(broker, undelivered_only=True, kind=THRESHOLD)
        assert alert.attempts == 1 and not alert.HasField("deliver_time")
        assert alert.last_error == f"HTTP 500 from webhook {webhook_id(hook.url)[:12]}"
        assert await slow.dispatch_due() == 0 and await dispatcher.dispatch_due() == 0
        assert len(hook.requests) == 1, "the next attempt waits for the backoff (1 h here)"
        clock.offset += timedelta(hours=1, seconds=1)

        async def delivered() -> bool:
            await dispatcher.dispatch_due()
            return bool(hook.accepted)

        await eventually(delivered)
        assert await dispatcher.dispatch_due() == 0
        assert len(hook.requests) == 4 and len(hook.accepted) == 1
        assert {headers["idempotency-key"] for headers, _ in hook.requests} == {alert.alert_id}
        assert {body["alert_id"] for _, body in hook.requests} == {alert.alert_id}
        assert await deliveries(broker) == 1
        [done] = await list_alerts(broker, kind=THRESHOLD)
        assert done.attempts == 4 and done.HasField("deliver_time")
        assert done.last_error.startswith("HTTP 500"), "the last error stays for the operator"
        assert await list_alerts(broker, undelivered_only=True, kind=THRESHOLD) == []
    finally:
        await slow.aclose()
        await dispatcher.aclose()


async def test_with_two_webhooks_the_one_that_took_it_is_not_sent_it_again(
    broker: Broker, clock: TestClock, receivers: StartReceiver
) -> None:
    good, flaky = await receivers(), await receivers(fail_first=3)
    dispatcher = AlertDispatcher(broker.runtime.db, clock, [good.url, flaky.url], **FAST)
    try:
        await broker.provision("frank", limit="10")
        await record(broker, "frank", "f-1", "8")

        async def delivered() -> bool:
            await dispatcher.dispatch_due()
            return await all_delivered(broker)

        await eventually(delivered)
        assert len(good.requests) == 1 and len(flaky.requests) == 4
        assert good.accepted[0]["alert_id"] == flaky.accepted[0]["alert_id"]
        assert await deliveries(broker) == 2
        [alert] = await list_alerts(broker, kind=THRESHOLD)
        assert alert.attempts == 4 and webhook_id(flaky.url)[:12] in alert.last_error
    finally:
        await dispatcher.aclose()


async def test_without_webhooks_alerts_are_kept_and_listed_but_not_sent(
    broker: Broker, clock: TestClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keybroker.alerts")
    await broker.provision("gina", limit="10")
    await record(broker, "gina", "g-1", "10")
    alerts = await list_alerts(broker, undelivered_only=True, kind=THRESHOLD)
    assert sorted(a.threshold_percent for a in alerts) == [80, 100]
    assert all(a.attempts == 0 and not a.HasField("deliver_time") for a in alerts)

    dispatcher = AlertDispatcher(broker.runtime.db, clock, [])
    try:
        for _ in range(3):
            assert await dispatcher.dispatch_due() == 0
    finally:
        await dispatcher.aclose()
    told = [r for r in caplog.records if "KEYBROKER_ALERT_WEBHOOKS" in r.getMessage()]
    assert len(told) == 1, "said once, not on every run"
    assert len(await list_alerts(broker, undelivered_only=True, kind=THRESHOLD)) == 2


def test_backoff_doubles_up_to_the_cap() -> None:
    delays = [backoff_delay(n, timedelta(seconds=1), timedelta(minutes=5)) for n in (1, 2, 3, 4, 9, 10, 500)]
    assert [d.total_seconds() for d in delays] == [1, 2, 4, 8, 256, 300, 300]


def test_a_webhook_that_is_not_an_http_url_is_a_config_error_that_does_not_quote_it() -> None:
    urls = ["https://hooks.example/services/ok", "ftp://files.example/services/T0-SECRET"]
    with pytest.raises(ConfigError, match="KEYBROKER_ALERT_WEBHOOKS: entry 2 ") as caught:
        AlertDispatcher(None, TestClock(), urls)  # type: ignore[arg-type]  # refused before any I/O
    assert "SECRET" not in str(caught.value) and "files.example" not in str(caught.value)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_webhook_urls_never_reach_logs_or_list_alerts(
    database_url: str,
    sandbox: Sandbox,
    clock: TestClock,
    tmp_path: Path,
    receivers: StartReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    good, flaky = await receivers(), await receivers(fail_first=1)
    dead = f"http://127.0.0.1:{closed_port()}/services/T0-{secrets.token_urlsafe(18)}"
    urls = (good.url, flaky.url, dead)
    async with running_broker(database_url, sandbox, tmp_path, clock, alert_webhooks=urls) as broker:
        await broker.provision("hank", limit="10")
        await record(broker, "hank", "h-1", "9")

        async def tried_twice() -> bool:
            [alert] = await list_alerts(broker, kind=THRESHOLD)
            return bool(flaky.accepted) and alert.attempts >= 2

        await eventually(tried_twice)
        reply = await broker.admin.ListAlerts(pb.ListAlertsRequest(), metadata=broker.as_admin(), timeout=10)
        [alert] = reply.alerts
        assert "ConnectError" in alert.last_error and not alert.HasField("deliver_time")
        stored = json.dumps(await outbox(broker), default=str)
        stored += str(await broker.runtime.db.fetch("SELECT * FROM alert_deliveries"))
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "[alert webhook" in logged, "httpx's request log line is there, redacted"
    for url in urls:
        secret_path = url.split("/services/")[1]
        for text in (logged, str(reply), stored):
            assert url not in text and secret_path not in text


# --- anomalies -----------------------------------------------------------------------------------


async def test_a_burst_far_above_the_trailing_average_raises_one_anomaly_per_hour(
    broker: Broker, clock: TestClock
) -> None:
    base = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
    for user in ("ivan", "jane", "kim"):
        await broker.provision(user, limit="1000")
    for hours_ago in range(2, 26):  # ivan: 0.05 USD an hour for a day, below the floor
        clock.fixed = base - timedelta(hours=hours_ago)
        await record(broker, "ivan", f"t-{hours_ago}", "0.05")
    # jane: a steady 3.5 USD an hour for two days (the roll-up RecordUsage keeps, seeded directly).
    await broker.runtime.db.execute(
        """INSERT INTO usage_hourly (user_id, hour, requests, cost_usd)
           SELECT 'jane', date_trunc('hour', $1::timestamptz AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                          - make_interval(hours => h), 1, 3.5
           FROM generate_series(1, 48) h""",
        base,
    )
    clock.fixed = base - timedelta(minutes=40)  # kim: 1.5 USD in the hour that ended 10 minutes ago
    await record(broker, "kim", "k-1", "1.5")
    clock.fixed = base
    detector = broker.runtime.alerts.detector

    await record(broker, "ivan", "b-1", "0.5")
    await record(broker, "jane", "b-1", "4")  # above the floor, but under 5 x her 1 USD average
    await detector.detect()
    assert [a.user_id for a in await list_alerts(broker, kind=pb.ALERT_KIND_ANOMALY)] == ["kim"]

    await record(broker, "ivan", "b-2", "1")  # 1.5 USD this hour: over the floor and 5 x 0.0071
    await detector.detect()
    [ivan] = await list_alerts(broker, kind=pb.ALERT_KIND_ANOMALY, user_id="ivan")
    assert (ivan.spent_usd, ivan.reference_usd) == ("1.5", "0.0071428571")  # 24 x 0.05 / 168 hours
    assert ivan.threshold_percent == 0 and ivan.month == month_label(period_start(base))
    [row] = [r for r in await outbox(broker, "ANOMALY") if r["user_id"] == "ivan"]
    assert row["dedup_key"] == "anomaly:" + base.strftime("%Y-%m-%dT%H")

    await record(broker, "ivan", "b-3", "3")
    assert await detector.detect() == 0
    clock.fixed = base + timedelta(minutes=20)
    assert await detector.detect() == 0, "once per user and hour"
    anomalies = await list_alerts(broker, kind=pb.ALERT_KIND_ANOMALY)
    assert sorted(a.user_id for a in anomalies) == ["ivan", "kim"]
    [kim] = [a for a in anomalies if a.user_id == "kim"]
    assert (kim.spent_usd, kim.reference_usd) == ("1.5", "0")
    assert await list_alerts(broker, kind=pb.ALERT_KIND_THRESHOLD) == []


# --- ListAlerts and the command line -------------------------------------------------------------


async def test_list_alerts_pages_newest_first_and_filters(broker: Broker, clock: TestClock) -> None:
    start = datetime.now(UTC)
    for n, user in enumerate(("u1", "u2", "u3")):
        await broker.provision(user, limit="10")
        clock.fixed = start + timedelta(seconds=n)
        await record(broker, user, "x-1", "8")
        clock.fixed = start + timedelta(seconds=n, milliseconds=500)
        await record(broker, user, "x-2", "2")
    clock.fixed = None
    everything = await list_alerts(broker)
    assert [(a.user_id, a.threshold_percent) for a in everything] == [
        ("u3", 100), ("u3", 80), ("u2", 100), ("u2", 80), ("u1", 100), ("u1", 80),
    ]  # fmt: skip

    seen: list[str] = []
    token = ""
    while True:
        page = await broker.admin.ListAlerts(
            pb.ListAlertsRequest(page_size=4, page_token=token), metadata=broker.as_admin()
        )
        assert len(page.alerts) <= 4
        seen += [a.alert_id for a in page.alerts]
        token = page.next_page_token
        if not token:
            break
    assert seen == [a.alert_id for a in everything]

    assert [a.threshold_percent for a in await list_alerts(broker, user_id="u2")] == [100, 80]
    assert len(await list_alerts(broker, kind=pb.ALERT_KIND_THRESHOLD, undelivered_only=True)) == 6
    assert await list_alerts(broker, kind=pb.ALERT_KIND_ANOMALY) == []
    assert await list_alerts(broker, user_id="nobody") == []


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": 1001}, "page_size"),
        ({"page_size": -1}, "page_size"),
        ({"kind": 7}, "kind"),
        ({"user_id": "not a user"}, "user_id"),
        ({"page_token": "not-a-token"}, "page_token"),
        ({"page_token": "WyJ4IiwgInkiLCAieiJd"}, "page_token"),  # base64 of ["x", "y", "z"]
    ],
)
async def test_list_alerts_refuses_bad_requests_naming_the_field(
    broker: Broker, request_fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.admin.ListAlerts(pb.ListAlertsRequest(**request_fields), metadata=broker.as_admin())
    assert_invalid_argument(caught.value, field)


async def test_list_alerts_is_an_admin_rpc(broker: Broker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.admin.ListAlerts(pb.ListAlertsRequest(), metadata=broker.as_agent())
    assert_rpc_error(caught.value, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")


async def test_client_and_cli_list_alerts(broker: Broker, tmp_path: Path) -> None:
    from keybroker_client import KeyBrokerClient

    await broker.provision("lena", limit="10")
    await broker.provision("mark", limit="10")
    await record(broker, "lena", "l-1", "10")
    await record(broker, "mark", "m-1", "8")
    async with KeyBrokerClient(broker.target, broker.admin_token) as client:
        page = await client.list_alerts(user_id="lena", kind="threshold", page_size=1)
        assert len(page.alerts) == 1 and page.next_page_token
        every = [a async for a in client.iter_alerts(page_size=1)]
        assert [a.user_id for a in every].count("lena") == 2 and len(every) == 3
        assert [a async for a in client.iter_alerts(kind="anomaly")] == []

    settings = broker.runtime.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OPENROUTER_"))}
    env |= {
        "KEYBROKER_DATABASE_URL": str(settings.database_url),
        "KEYBROKER_MASTER_KEY": str(settings.master_key),
        "KEYBROKER_DATA_DIR": str(tmp_path),
        "KEYBROKER_LISTEN": broker.target,
        "KEYBROKER_TOKEN": broker.admin_token,
    }
    argv = [sys.executable, "-m", "broker", "alerts", "list", "--user", "lena", "--kind", "threshold"]
    listed = await asyncio.to_thread(
        subprocess.run, [*argv, "--json"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert sorted((r["user_id"], r["kind"], r["threshold_percent"]) for r in rows) == [
        ("lena", "threshold", 80),
        ("lena", "threshold", 100),
    ]
    assert all(r["deliver_time"] is None and r["spent_usd"] == "10" for r in rows)
    table = await asyncio.to_thread(
        subprocess.run,
        [*argv, "--undelivered"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[:3] == ["CREATE_TIME", "USER_ID", "KIND"] and len(lines) == 2
