"""ReportKeyInvalid: an agent got 401 from OpenRouter with a key we handed out.

OpenRouter has transient 401s, so a report alone never rotates a key: OpenRouter must confirm the
key disabled or missing. Checks are rate-limited per user across replicas (a row per user).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from broker.errors import KeyDisabled, ProviderKeyNotFound
from broker.keys import KeyService
from broker.storage import maintenance_store

ROTATED = "ROTATED"
KEY_VALID = "KEY_VALID"
STALE_KEY = "STALE_KEY"
RATE_LIMITED = "RATE_LIMITED"


@dataclass(frozen=True)
class ReportOutcome:
    outcome: str
    key_id: str
    key_version: int


class KeyReports:
    def __init__(self, keys: KeyService, min_interval: timedelta) -> None:
        self.keys = keys
        self.min_interval = min_interval

    async def report_invalid(self, user_id: str, key_id: str, actor: str) -> ReportOutcome:
        current = await self.keys.info(user_id)
        if current.status != "active" or current.disabled:
            raise KeyDisabled(user_id)
        if key_id != current.key_id:
            return ReportOutcome(STALE_KEY, current.key_id, current.key_version)
        now = self.keys.clock()
        if not await maintenance_store.take_report_slot(self.keys.db, user_id, now, now - self.min_interval):
            return ReportOutcome(RATE_LIMITED, current.key_id, current.key_version)
        try:
            provider_key = await self.keys.provider.get_key(key_id)
            confirmed = provider_key.disabled
        except ProviderKeyNotFound:
            confirmed = True
        if not confirmed:
            return ReportOutcome(KEY_VALID, current.key_id, current.key_version)
        rotation = await self.keys.rotate(user_id, f"report-invalid:{key_id}", timedelta(0), False, actor)
        return ReportOutcome(ROTATED, rotation.key_id, rotation.key_version)
