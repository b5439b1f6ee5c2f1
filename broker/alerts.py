"""Usage alerts: delivery of the outbox to webhooks, anomaly detection, and their listing.

Threshold alerts are written by RecordUsage itself (kb_record_usage, in the transaction that
crossed the threshold; unique per user, month and threshold), so nothing here is on the hot path:
the dispatcher is a background task that POSTs each undelivered alert to every configured webhook
until each answered 2xx (at least once; receivers deduplicate by `alert_id`, also sent as the
`Idempotency-Key` header). Webhook URLs are secrets (a Slack webhook URL is its own credential):
they are never logged or stored; a webhook is known by the SHA-256 of its URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx

from broker.clock import Clock, month_label
from broker.config import ConfigError, Settings
from broker.db import Database
from broker.errors import InvalidArgument
from broker.money import format_usd
from broker.paging import decode_token, encode_token, split_page
from broker.storage import alerts_store
from broker.storage.alerts_store import AlertFilter, AlertRow, DueAlert
from broker.validation import USER_ID

__all__ = ["AlertDispatcher", "AlertFilter", "AlertJobs", "AlertRow", "AnomalyDetector", "RateWindowPruner"]

log = logging.getLogger("keybroker.alerts")

TRAILING_WINDOW = timedelta(hours=168)
RATE_WINDOW_KEEP = timedelta(minutes=10)


def backoff_delay(failures: int, base: timedelta, cap: timedelta) -> timedelta:
    """Wait after the n-th failed attempt in a row: base, 2 x base, 4 x base ... at most `cap`."""
    return min(cap, base * (1 << min(max(failures - 1, 0), 30)))


def webhook_id(url: str) -> str:
    """How a webhook is named in the database and in logs: the SHA-256 (hex) of its URL."""
    return hashlib.sha256(url.encode()).hexdigest()


def check_webhook_url(url: str, position: int) -> str:
    """A ConfigError naming the entry (never quoting it: the URL is a secret) unless http(s)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"KEYBROKER_ALERT_WEBHOOKS: entry {position} is not an http(s) URL")
    return url


def alert_payload(alert: AlertRow) -> dict[str, Any]:
    """The JSON body of a delivery: Slack incoming webhooks show `text`; the rest is for machines
    (money as decimal strings, times in ISO 8601 UTC)."""
    return {
        "text": alert_text(alert),
        "alert_id": str(alert.alert_id),
        "kind": alert.kind,
        "user_id": alert.user_id,
        "month": month_label(alert.period_start),
        "threshold_percent": alert.threshold_percent,
        "spent_usd": format_usd(alert.spent_usd),
        "reference_usd": format_usd(alert.reference_usd),
        "create_time": alert.create_time.astimezone(UTC).isoformat(),
    }


def alert_text(alert: AlertRow) -> str:
    spent, reference = format_usd(alert.spent_usd), format_usd(alert.reference_usd)
    if alert.kind == "THRESHOLD":
        return (
            f"keybroker: user {alert.user_id} has spent ${spent} of ${reference} in "
            f"{month_label(alert.period_start)} ({alert.threshold_percent}% of the monthly limit reached)"
        )
    hour = alert.dedup_key.removeprefix("anomaly:")
    return (
        f"keybroker: unusual spend by user {alert.user_id}: ${spent} in the hour {hour}:00 UTC, "
        f"against a trailing hourly average of ${reference}"
    )


class _RedactWebhooks(logging.Filter):
    """httpx logs every request with its full URL at INFO; the URLs of alert webhooks are secrets."""

    def __init__(self, urls: Sequence[str]) -> None:
        super().__init__()
        self.replacements: list[tuple[str, str]] = []
        for url in urls:
            label = f"[alert webhook {webhook_id(url)[:12]}]"
            for variant in {url, str(httpx.URL(url))}:
                self.replacements.append((variant, label))
        self.replacements.sort(key=lambda pair: -len(pair[0]))  # longest variant first

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for secret, label in self.replacements:
            redacted = redacted.replace(secret, label)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class AlertDispatcher:
    """Delivers due alerts to every configured webhook, retrying with exponential backoff."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        webhooks: Sequence[str],
        *,
        timeout: float = 5.0,
        backoff_base: timedelta = timedelta(seconds=1),
        backoff_cap: timedelta = timedelta(minutes=5),
        batch_size: int = 100,
        concurrency: int = 10,
    ) -> None:
        self.db = db
        self.clock = clock
        self.webhooks = {webhook_id(check_webhook_url(url, n)): url for n, url in enumerate(webhooks, 1)}
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.batch_size = batch_size
        self._limit = asyncio.Semaphore(concurrency)
        # Time one batch may take (its alerts in waves of `concurrency`, each wave up to one
        # timeout): other dispatchers leave claimed alerts alone that long.
        waves = math.ceil(batch_size / concurrency)
        self.claim_time = timedelta(seconds=waves * timeout + 10)
        self._http = httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        self._redact = _RedactWebhooks(list(self.webhooks.values()))
        logging.getLogger("httpx").addFilter(self._redact)
        self._told_no_webhooks = False
        # Told after each run: (alerts delivered by it, alerts still undelivered). The metrics use it.
        self.on_dispatched: Callable[[int, int], None] | None = None

    async def aclose(self) -> None:
        await self._http.aclose()
        logging.getLogger("httpx").removeFilter(self._redact)

    async def dispatch_due(self) -> int:
        """Deliver one batch of due alerts; returns how many reached every webhook."""
        if not self.webhooks:
            if not self._told_no_webhooks:
                self._told_no_webhooks = True
                log.info(
                    "no KEYBROKER_ALERT_WEBHOOKS: usage alerts are recorded (see ListAlerts) but not sent"
                )
            if self.on_dispatched is not None:
                self.on_dispatched(0, await alerts_store.count_undelivered(self.db))
            return 0
        now = self.clock()
        due = await alerts_store.claim_due(self.db, now, now + self.claim_time, self.batch_size)
        delivered = sum(await asyncio.gather(*(self._deliver(item) for item in due)))
        if self.on_dispatched is not None:
            self.on_dispatched(delivered, await alerts_store.count_undelivered(self.db))
        return delivered

    async def _deliver(self, item: DueAlert) -> int:
        """One attempt at one alert: POST it to each webhook that does not have it yet, then record
        the outcome; 1 if every webhook has it now."""
        alert = item.alert
        pending = [(wid, url) for wid, url in self.webhooks.items() if wid not in item.delivered_to]
        body = alert_payload(alert)
        async with self._limit:
            outcomes = await asyncio.gather(*(self._post(url, body) for _, url in pending))
        delivered = [wid for (wid, _), error in zip(pending, outcomes, strict=True) if error is None]
        errors = [
            f"{error} from webhook {wid[:12]}"
            for (wid, _), error in zip(pending, outcomes, strict=True)
            if error is not None
        ]
        now = self.clock()
        if not errors:
            await alerts_store.finish_attempt(self.db, alert, now, delivered, True, None, now)
            log.info("alert %s (%s, user %s) delivered", alert.alert_id, alert.kind, alert.user_id)
            return 1
        delay = self.backoff(alert.attempts + 1)
        error = "; ".join(errors)
        await alerts_store.finish_attempt(self.db, alert, now, delivered, False, error, now + delay)
        log.warning(
            "alert %s (user %s) not delivered: %s; attempt %d, next in %.1f s",
            alert.alert_id,
            alert.user_id,
            error,
            alert.attempts + 1,
            delay.total_seconds(),
        )
        return 0

    async def _post(self, url: str, body: dict[str, Any]) -> str | None:
        """POST one alert; None on a 2xx, else what went wrong (a status or an error class; never
        the exception text, which may quote the URL)."""
        try:
            reply = await self._http.post(
                url,
                content=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Idempotency-Key": body["alert_id"]},
                timeout=self.timeout,
            )
        except Exception as exc:  # any failure of one webhook is that webhook's error, retried later
            return type(exc).__name__
        return None if 200 <= reply.status_code < 300 else f"HTTP {reply.status_code}"

    def backoff(self, failures: int) -> timedelta:
        return backoff_delay(failures, self.backoff_base, self.backoff_cap)


class AnomalyDetector:
    """Raises an ANOMALY alert when a user's spend in an hour is far above their usual hourly spend."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        factor: Decimal,
        floor_usd: Decimal,
        window: timedelta = TRAILING_WINDOW,
    ) -> None:
        self.db = db
        self.clock = clock
        self.factor = factor
        self.floor_usd = floor_usd
        self.window = window

    async def detect(self) -> int:
        """Check the current UTC hour, and the hour that just ended (so spend in its last minutes,
        after the previous run, is not missed); returns how many alerts were raised."""
        now = self.clock()
        current = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        raised = 0
        for hour in (current - timedelta(hours=1), current):
            for alert in await alerts_store.insert_anomalies(
                self.db, hour, now, self.factor, self.floor_usd, self.window
            ):
                log.info(
                    "anomaly: user %s spent %s USD in the hour %s (trailing hourly average %s USD)",
                    alert.user_id,
                    format_usd(alert.spent_usd),
                    alert.dedup_key.removeprefix("anomaly:"),
                    format_usd(alert.reference_usd),
                )
                raised += 1
        return raised


class RateWindowPruner:
    """Deletes per-minute rate-limit windows that can no longer matter."""

    def __init__(self, db: Database, clock: Clock, keep: timedelta = RATE_WINDOW_KEEP) -> None:
        self.db = db
        self.clock = clock
        self.keep = keep

    async def prune(self) -> int:
        return await alerts_store.prune_rate_windows(self.db, self.clock() - self.keep)


@dataclass
class AlertJobs:
    """The alerting parts a runtime owns; `aclose` closes the dispatcher's HTTP client."""

    dispatcher: AlertDispatcher
    detector: AnomalyDetector
    pruner: RateWindowPruner

    @classmethod
    def build(cls, db: Database, clock: Clock, settings: Settings) -> AlertJobs:
        return cls(
            dispatcher=AlertDispatcher(db, clock, settings.alert_webhooks),
            detector=AnomalyDetector(db, clock, settings.anomaly_factor, settings.anomaly_floor_usd),
            pruner=RateWindowPruner(db, clock),
        )

    async def aclose(self) -> None:
        await self.dispatcher.aclose()


# -- ListAlerts ------------------------------------------------------------------------------


async def list_alerts(
    db: Database, where: AlertFilter, page_token: str, page_size: int
) -> tuple[list[AlertRow], str]:
    """One page, newest first, and the token of the next page ("" on the last)."""
    found = await alerts_store.list_alerts(db, where, decode_page_token(page_token), page_size + 1)
    rows, last = split_page(found, page_size)
    return rows, ("" if last is None else encode_page_token(last))


def encode_page_token(last: AlertRow) -> str:
    return encode_token(json.dumps([last.create_time.isoformat(), last.user_id, str(last.alert_id)]))


def decode_page_token(token: str) -> tuple[datetime, str, uuid.UUID] | None:
    if not token:
        return None
    try:
        stamp, user_id, alert_id = json.loads(decode_token(token))
        if not all(isinstance(value, str) for value in (stamp, user_id, alert_id)):
            raise ValueError("not strings")
        create_time = datetime.fromisoformat(stamp)
        if create_time.tzinfo is None or not USER_ID.fullmatch(user_id):
            raise ValueError("not a key")
        return create_time, user_id, uuid.UUID(alert_id)
    except (ValueError, TypeError):
        raise InvalidArgument("page_token", "is not a token from a previous ListAlerts response") from None
