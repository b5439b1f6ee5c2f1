"""The reconciler: compares every OpenRouter key with the database and repairs the differences.

OpenRouter is a backstop, the database the source of truth. Only keys whose name carries our
prefix are ever touched, so other keys of the same OpenRouter account are safe.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from broker.clock import period_start
from broker.errors import KeybrokerError
from broker.keys import KeyService, provider_limit
from broker.openrouter import ProviderKey
from broker.provisioning import KEY_NAME_PREFIX
from broker.storage import intents_store, maintenance_store
from broker.storage.maintenance_store import KeyState

log = logging.getLogger("keybroker.reconcile")

ORPHAN_KEY = "ORPHAN_KEY"
MISSING_KEY = "MISSING_KEY"
DISABLED_AT_PROVIDER = "DISABLED_AT_PROVIDER"
LIMIT_MISMATCH = "LIMIT_MISMATCH"
SPEND_DRIFT = "SPEND_DRIFT"
UNRETIRED_KEY = "UNRETIRED_KEY"
STALE_INTENT = "STALE_INTENT"


@dataclass(frozen=True)
class Finding:
    kind: str
    user_id: str
    key_id: str
    detail: str
    provider_usd: Decimal | None = None
    broker_usd: Decimal | None = None
    fixed: bool = False


@dataclass
class Report:
    dry_run: bool
    provider_keys: int = 0
    database_keys: int = 0
    findings: list[Finding] = field(default_factory=list)


def user_of(name: str) -> str:
    """'keybroker:<user>:v<n>' -> '<user>' ('' when the name is not ours)."""
    if not name.startswith(KEY_NAME_PREFIX):
        return ""
    return name[len(KEY_NAME_PREFIX) :].rsplit(":v", 1)[0]


class Reconciler:
    def __init__(self, keys: KeyService, drift_tolerance: Decimal) -> None:
        self.keys = keys
        self.drift_tolerance = drift_tolerance

    async def run(self, dry_run: bool = False) -> Report:
        report = Report(dry_run)
        await self._stale_intents(report)
        provider_keys = await self.keys.provider.list_all_keys(include_disabled=True)
        period = period_start(self.keys.clock())
        states = await maintenance_store.key_states(self.keys.db, period)
        report.provider_keys, report.database_keys = len(provider_keys), len(states)
        by_hash = {key.hash: key for key in provider_keys}
        await self._orphans(report, provider_keys, {state.key_id for state in states})
        for state in states:
            provider_key = by_hash.get(state.key_id)
            if state.is_current and state.status == "active":
                await self._current_key(report, state, provider_key, period)
            else:
                await self._old_key(report, state, provider_key)
        if not dry_run:
            await self.keys.retire_due()
        log.info(
            "reconcile%s: %d provider keys, %d database keys, %d findings",
            " (dry run)" if dry_run else "",
            report.provider_keys,
            report.database_keys,
            len(report.findings),
        )
        return report

    async def _stale_intents(self, report: Report) -> None:
        minter = self.keys.minter
        if report.dry_run:
            stale = await intents_store.stale_pending(self.keys.db, self.keys.clock() - minter.intent_timeout)
        else:
            stale = await minter.roll_back_stale()
        for intent in stale:
            detail = f"unfinished {intent.kind} of version {intent.key_version}: rolled back"
            report.findings.append(
                Finding(STALE_INTENT, intent.user_id, "", detail, fixed=not report.dry_run)
            )

    async def _orphans(self, report: Report, provider_keys: list[ProviderKey], known: set[str]) -> None:
        in_flight = await intents_store.live_pending_names(
            self.keys.db, self.keys.clock() - self.keys.minter.intent_timeout
        )
        for key in provider_keys:
            if key.hash in known or not key.name.startswith(KEY_NAME_PREFIX) or key.name in in_flight:
                continue
            await self._fix(
                report,
                Finding(ORPHAN_KEY, user_of(key.name), key.hash, f"{key.name} is unknown to the broker"),
                self.keys.minter.remove_orphans(key.name),
            )

    async def _current_key(
        self, report: Report, state: KeyState, key: ProviderKey | None, period: date
    ) -> None:
        if key is None or (key.disabled and not state.user_disabled):
            kind = MISSING_KEY if key is None else DISABLED_AT_PROVIDER
            detail = "missing at OpenRouter" if key is None else "disabled at OpenRouter"
            rotation = self.keys.rotate(
                state.user_id, f"reconcile:{state.key_id}", timedelta(0), False, "reconciler"
            )
            await self._fix(
                report, Finding(kind, state.user_id, state.key_id, detail + ": rotated"), rotation
            )
            return
        if state.user_disabled and not key.disabled:
            await self._fix(
                report,
                Finding(UNRETIRED_KEY, state.user_id, state.key_id, "suspended user's key enabled: disabled"),
                self.keys.provider.update_key(state.key_id, disabled=True),
            )
        await self._limit(report, state, key, period)
        drift = key.usage_monthly - state.recorded_usd
        if abs(drift) > self.drift_tolerance:
            report.findings.append(
                Finding(
                    SPEND_DRIFT,
                    state.user_id,
                    state.key_id,
                    f"OpenRouter counts {drift:+f} USD more this month than was recorded",
                    provider_usd=key.usage_monthly,
                    broker_usd=state.recorded_usd,
                )
            )

    async def _limit(self, report: Report, state: KeyState, key: ProviderKey, period: date) -> None:
        same_month = state.limit_base_period == period
        expected = provider_limit(state.limit_usd, state.limit_base_usd if same_month else Decimal(0))
        if expected == key.limit:
            return
        finding = Finding(
            LIMIT_MISMATCH,
            state.user_id,
            state.key_id,
            "provider limit out of step: updated",
            provider_usd=key.limit,
            broker_usd=expected,
        )
        await self._fix(report, finding, self._set_limit(state, expected, same_month, period))

    async def _set_limit(
        self, state: KeyState, limit: Decimal | None, same_month: bool, period: date
    ) -> None:
        await self.keys.provider.update_key(
            state.key_id, limit=limit, limit_reset=None if limit is None else "monthly"
        )
        if not same_month:  # a new month: the key's window restarted with the full limit
            await maintenance_store.restart_limit_base(self.keys.db, state.user_id, state.key_version, period)

    async def _old_key(self, report: Report, state: KeyState, key: ProviderKey | None) -> None:
        if state.retired_time is None or key is None or key.disabled:
            return  # still in its grace period, or retired as it should be
        await self._fix(
            report,
            Finding(UNRETIRED_KEY, state.user_id, state.key_id, "retired key still enabled: disabled"),
            self.keys.provider.update_key(state.key_id, disabled=True),
        )

    async def _fix(self, report: Report, finding: Finding, repair: Coroutine[Any, Any, object]) -> None:
        """Record the finding; unless this is a dry run, await the repair and mark it fixed."""
        fixed = False
        if not report.dry_run:
            try:
                await repair
                fixed = True
            except KeybrokerError as exc:
                log.warning(
                    "reconcile could not repair %s of %s: %s", finding.kind, finding.user_id, exc.reason
                )
        else:
            repair.close()  # never run in a dry run
        report.findings.append(
            Finding(
                finding.kind,
                finding.user_id,
                finding.key_id,
                finding.detail,
                finding.provider_usd,
                finding.broker_usd,
                fixed,
            )
        )
