"""Crash-safe creation of provider keys.

OpenRouter shows a key's secret once, in the create response, and has no idempotency key. So:
1. claim an intent row for (user, version) before calling OpenRouter;
2. create the key under a name unique to (user, version), so it can always be found by listing;
3. seal the secret and commit it together with finishing the intent (keys_store._store_new_key).
A provider key whose secret was not stored is an orphan: it is disabled and deleted, by the
attempt itself when it can, else by whoever rolls the dead intent back (a retry of the same
request, server start, or the reconciler).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from broker import crypto
from broker.clock import Clock, period_start
from broker.db import Database
from broker.errors import ProviderError, ProviderKeyNotFound
from broker.openrouter import OpenRouterClient
from broker.storage import intents_store
from broker.storage.intents_store import Intent
from broker.storage.keys_store import NewKey

log = logging.getLogger("keybroker.provisioning")

CrashHook = Callable[[str], None]
KEY_NAME_PREFIX = "keybroker:"


class SimulatedCrash(BaseException):
    """Raised by a test's crash hook: the process 'dies' at that point, skipping all clean-up."""


class IntentBusy(Exception):
    """Another attempt holds the intent for this (user, version)."""

    def __init__(self, intent: Intent) -> None:
        super().__init__(f"intent {intent.user_id} v{intent.key_version} is {intent.state}")
        self.intent = intent


@dataclass(frozen=True)
class Minted:
    key: NewKey
    intent: Intent


def provider_key_name(user_id: str, key_version: int) -> str:
    """Unique per user and version, so a create whose response was lost can be found by listing."""
    return f"{KEY_NAME_PREFIX}{user_id}:v{key_version}"


class KeyMinter:
    def __init__(
        self,
        db: Database,
        provider: OpenRouterClient,
        ring: crypto.KeyRing,
        clock: Clock,
        intent_timeout: timedelta,
    ) -> None:
        self.db = db
        self.provider = provider
        self.ring = ring
        self.clock = clock
        self.intent_timeout = intent_timeout
        # Tests set this to raise SimulatedCrash at a named point.
        self.crash_hook: CrashHook | None = None

    def crash_point(self, name: str) -> None:
        if self.crash_hook is not None:
            self.crash_hook(name)

    async def mint(
        self,
        user_id: str,
        version: int,
        limit: Decimal | None,
        request_id: str,
        spent_before: Decimal,
        kind: str,
    ) -> Minted:
        """Create and seal the provider key of (user, version); raises IntentBusy or ProviderError."""
        now = self.clock()
        name = provider_key_name(user_id, version)
        claim = await intents_store.claim(
            self.db, user_id, version, request_id, kind, name, now, now - self.intent_timeout
        )
        if not claim.claimed:
            raise IntentBusy(claim.intent)
        if claim.took_over is not None:
            try:
                await self.remove_orphans(name)  # the dead attempt may have made a key we cannot use
            except ProviderError:
                await intents_store.abandon(self.db, claim.intent)  # the next retry takes over again
                raise
        self.crash_point("intent_claimed")
        try:
            created = await self.provider.create_key(name, limit)
        except ProviderError:
            await self._abandon(claim.intent)
            raise
        self.crash_point("key_created")
        identity = crypto.key_row_identity(user_id, version, created.key.hash)
        kek_id, sealed = crypto.seal(self.ring, created.secret, identity)
        key = NewKey(
            user_id=user_id,
            key_version=version,
            key_id=created.key.hash,
            provider_name=created.key.name,
            sealed=sealed,
            kek_id=kek_id,
            request_id=request_id,
            limit_base_usd=spent_before,
            limit_base_period=period_start(now),
            create_time=self.clock(),
        )
        return Minted(key, claim.intent)

    async def discard(self, minted: Minted) -> None:
        """The commit lost (or failed): delete the key we made and roll our intent back."""
        try:
            await self._delete(minted.key.key_id)
        except ProviderError as exc:
            log.warning("could not delete unused key %s: %s", minted.key.key_id, exc.reason)
            return  # the intent stays pending; the reconciler removes the key later
        await intents_store.roll_back(self.db, minted.intent, self.clock())

    async def roll_back_stale(self) -> list[Intent]:
        """Roll back every attempt that died (pending past the timeout); returns them."""
        now = self.clock()
        rolled: list[Intent] = []
        for intent in await intents_store.stale_pending(self.db, now - self.intent_timeout):
            try:
                await self.remove_orphans(intent.provider_name)
            except ProviderError as exc:
                log.warning("rolling back %s deferred: %s", intent.provider_name, exc.reason)
                continue
            if await intents_store.roll_back(self.db, intent, now):
                rolled.append(intent)
        return rolled

    async def remove_orphans(self, name: str) -> int:
        """Disable and delete every provider key with this name (their secrets are lost)."""
        found = await self.provider.find_keys_by_name(name)
        for key in found:
            await self._delete(key.hash)
        return len(found)

    async def _abandon(self, intent: Intent) -> None:
        """After a failed create: a lost response may still have made the key, so look for it."""
        try:
            removed = await self.remove_orphans(intent.provider_name)
        except ProviderError as exc:
            log.warning("create of %s failed and clean-up deferred: %s", intent.provider_name, exc.reason)
            await intents_store.abandon(self.db, intent)
            return
        if removed:
            log.warning(
                "removed %d orphan key(s) named %s after a failed create", removed, intent.provider_name
            )
        await intents_store.roll_back(self.db, intent, self.clock())

    async def _delete(self, key_hash: str) -> None:
        try:
            await self.provider.update_key(key_hash, disabled=True)
            await self.provider.delete_key(key_hash)
        except ProviderKeyNotFound:
            pass
