"""Key lifecycle: disclose, provision, rotate, revoke, update, retire.

OpenRouter is called outside database transactions; the database decides who wins a race, and a
provider key that lost one is deleted again. Retirement of an old provider key is a row in the
database (api_keys.retire_at), so it happens even if this replica dies before doing it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import grpc

from broker import crypto
from broker.clock import Clock, period_start
from broker.db import Database
from broker.errors import (
    ConcurrentRotation,
    InvalidArgument,
    KeybrokerError,
    KeyDisabled,
    KeyExists,
    MonthlyLimitExceeded,
    NoApiKey,
    ProviderError,
    ProviderKeyNotFound,
    RateLimited,
    RequestInProgress,
)
from broker.ledger import seconds_to_next_minute
from broker.openrouter import OpenRouterClient
from broker.paging import decode_token, encode_token, split_page
from broker.provisioning import IntentBusy, KeyMinter, Minted
from broker.storage import intents_store, keys_store
from broker.storage.audit_writes import AuditEvent
from broker.storage.keys_store import KeyRecord, UserKey
from broker.validation import USER_ID

log = logging.getLogger("keybroker.keys")


def _reused_request_id() -> InvalidArgument:
    return InvalidArgument("request_id", "was already used by another operation on this user")


class SecretUnreadable(KeybrokerError):
    """A stored secret does not open with the configured master key: a deployment fault that a
    retry cannot fix (an operator must restore the right key, or re-provision)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "KEY_UNREADABLE"


@dataclass(frozen=True)
class DisclosedKey:
    api_key: str
    key_id: str
    key_version: int
    limit_usd: Decimal | None
    spent_usd: Decimal
    reserved_usd: Decimal

    def __repr__(self) -> str:
        return f"DisclosedKey(key_id={self.key_id!r}, key_version={self.key_version})"


@dataclass(frozen=True)
class Rotation:
    key_id: str
    key_version: int
    previous_key_id: str
    previous_key_expire_time: datetime


def provider_limit(limit: Decimal | None, spent_before_key: Decimal) -> Decimal | None:
    """The provider key's own monthly cap: what is left of the user's limit when it was made."""
    if limit is None:
        return None
    return max(limit - spent_before_key, Decimal(0))


class KeyService:
    def __init__(
        self,
        db: Database,
        provider: OpenRouterClient,
        ring: crypto.KeyRing,
        clock: Clock,
        intent_timeout: timedelta = timedelta(seconds=30),
    ) -> None:
        self.db = db
        self.provider = provider
        self.ring = ring
        self.clock = clock
        self.minter = KeyMinter(db, provider, ring, clock, intent_timeout)

    async def get_key(self, user_id: str, actor: str) -> DisclosedKey:
        now = self.clock()
        found = await keys_store.disclose_key(self.db, user_id, period_start(now), now, actor)
        if found.outcome == "no_key":
            raise NoApiKey(user_id)
        if found.outcome == "disabled":
            raise KeyDisabled(user_id)
        if found.outcome == "rate_limited":
            raise RateLimited(user_id, seconds_to_next_minute(now))
        if found.outcome == "limit":
            assert found.limit_usd is not None
            raise MonthlyLimitExceeded(user_id, found.limit_usd, found.spent_usd)
        assert found.key_id and found.key_version and found.sealed and found.kek_id
        identity = crypto.key_row_identity(user_id, found.key_version, found.key_id)
        try:
            secret = crypto.open_sealed(self.ring, found.kek_id, found.sealed, identity)
        except crypto.SealError as exc:
            log.error("stored key of user %s does not open: %s", user_id, exc)
            raise SecretUnreadable(
                "the stored key cannot be decrypted with the configured master key"
            ) from None
        return DisclosedKey(
            secret, found.key_id, found.key_version, found.limit_usd, found.spent_usd, found.reserved_usd
        )

    async def info(self, user_id: str) -> UserKey:
        found = await keys_store.find_user(self.db, user_id, period_start(self.clock()))
        if found is None:
            raise NoApiKey(user_id)
        return found

    async def provision(
        self, user_id: str, tier: str, custom_limit: Decimal | None, request_id: str, actor: str
    ) -> UserKey:
        exists, tier_limit = await keys_store.tier_limit(self.db, tier)
        if not exists:
            raise InvalidArgument("tier", f"unknown tier {tier!r}")
        current = await keys_store.find_user(self.db, user_id, period_start(self.clock()))
        if current is not None:
            made = await self._made_by(user_id, request_id)
            if made is not None and made[0] == "provision":
                return current  # a retry of the provisioning that made this key
            if made is not None:
                raise _reused_request_id()
            if current.status != "revoked":
                raise KeyExists(user_id)
        version = 1 if current is None else current.key_version + 1
        spent = Decimal(0) if current is None else current.spent_usd
        limit = custom_limit if custom_limit is not None else tier_limit
        minted = await self._mint(
            user_id, version, provider_limit(limit, spent), request_id, spent, "provision"
        )
        if minted is None:
            return await self.info(user_id)
        event = AuditEvent(
            user_id,
            actor,
            "key.provisioned",
            {
                "key_id": minted.key.key_id,
                "key_version": version,
                "tier": tier,
                "custom_limit_usd": custom_limit,
            },
        )
        store = keys_store.insert_user_with_key if current is None else keys_store.reissue_key
        stored = store(self.db, minted.key, tier, custom_limit, event, minted.intent)
        if not await self._commit_or_discard(minted, stored):
            if await keys_store.find_key_by_request(self.db, user_id, request_id):
                return await self.info(user_id)
            raise KeyExists(user_id)
        return await self.info(user_id)

    async def rotate(
        self, user_id: str, request_id: str, grace: timedelta, delete_old: bool, actor: str
    ) -> Rotation:
        replay = await self._rotation_replay(user_id, request_id)
        if replay is not None:
            return replay
        current = await self.info(user_id)
        if current.status != "active" or current.disabled:
            raise KeyDisabled(user_id)
        version = current.key_version + 1
        limit = provider_limit(current.limit_usd, current.spent_usd)
        minted = await self._mint(user_id, version, limit, request_id, current.spent_usd, "rotate")
        if minted is None:
            replay = await self._rotation_replay(user_id, request_id)
            assert replay is not None
            return replay
        retire_at = minted.key.create_time + grace
        event = AuditEvent(
            user_id,
            actor,
            "key.rotated",
            {
                "key_id": minted.key.key_id,
                "key_version": version,
                "previous_key_id": current.key_id,
                "grace_seconds": grace.total_seconds(),
                "delete_old": delete_old,
            },
        )
        stored = keys_store.rotate(self.db, minted.key, retire_at, delete_old, event, minted.intent)
        if not await self._commit_or_discard(minted, stored):
            replay = await self._rotation_replay(user_id, request_id)
            if replay is not None:
                return replay
            raise ConcurrentRotation(user_id)
        self.minter.crash_point("rotation_committed")
        if grace <= timedelta(0):
            await self.retire_now(user_id, current.key_version)
        return Rotation(minted.key.key_id, version, current.key_id, retire_at)

    async def revoke(self, user_id: str, delete: bool, actor: str) -> UserKey:
        now = self.clock()
        event = AuditEvent(user_id, actor, "key.revoked", {"delete": delete})
        if await keys_store.revoke(self.db, user_id, now, delete, event) is None:
            return await self.info(user_id)  # unknown user -> NoApiKey; already revoked -> as is
        for record in await keys_store.due_retirements(self.db, now, user_id=user_id):
            await self._retire_or_defer(record)
        return await self.info(user_id)

    async def update(
        self,
        user_id: str,
        actor: str,
        tier: str | None = None,
        custom_limit: Decimal | None = None,
        clear_custom_limit: bool = False,
        disabled: bool | None = None,
        requests_per_minute: int | None = None,
    ) -> UserKey:
        current = await self.info(user_id)
        if current.status == "revoked":
            raise KeyDisabled(user_id, "the user's key is revoked; provision a new one")
        exists, tier_limit = await keys_store.tier_limit(self.db, tier or current.tier)
        if not exists:
            raise InvalidArgument("tier", f"unknown tier {tier!r}")
        custom = None if clear_custom_limit else custom_limit
        if custom is None and not clear_custom_limit:
            custom = current.custom_limit_usd
        new_limit = custom if custom is not None else tier_limit
        await self._sync_provider(current, new_limit, disabled)
        event = AuditEvent(
            user_id,
            actor,
            "key.updated",
            {
                "tier": tier,
                "custom_limit_usd": custom_limit,
                "clear_custom_limit": clear_custom_limit,
                "disabled": disabled,
                "limit_usd": new_limit,
                "requests_per_minute": requests_per_minute,
            },
        )
        await keys_store.update_settings(
            self.db,
            user_id,
            self.clock(),
            event,
            tier,
            custom_limit,
            clear_custom_limit,
            disabled,
            requests_per_minute,
        )
        return await self.info(user_id)

    async def list(self, page_token: str, page_size: int) -> tuple[list[UserKey], str]:
        after = decode_page_token(page_token)
        found = await keys_store.list_users(self.db, after, page_size + 1, period_start(self.clock()))
        rows, last = split_page(found, page_size)
        return rows, ("" if last is None else encode_page_token(last.user_id))

    async def retire_due(self) -> int:
        """Disable (or delete) provider keys whose grace has ended; returns how many."""
        done = 0
        for record in await keys_store.due_retirements(self.db, self.clock()):
            try:
                await self._retire(record)
                done += 1
            except ProviderError as exc:
                log.warning(
                    "retiring key %s of %s failed, will retry: %s", record.key_id, record.user_id, exc.reason
                )
        return done

    async def retire_now(self, user_id: str, key_version: int) -> None:
        """Retire a key at once; on provider failure the background retirer finishes the job."""
        record = await keys_store.find_key(self.db, user_id, key_version)
        if record is not None:
            await self._retire_or_defer(record)

    async def _retire_or_defer(self, record: KeyRecord) -> None:
        try:
            await self._retire(record)
        except ProviderError as exc:
            log.warning("retiring key %s of %s deferred: %s", record.key_id, record.user_id, exc.reason)

    async def _retire(self, record: KeyRecord) -> None:
        try:
            if record.retire_delete:
                await self.provider.delete_key(record.key_id)
            else:
                await self.provider.update_key(record.key_id, disabled=True)
        except ProviderKeyNotFound:
            pass  # already gone at the provider: nothing left that could work
        await keys_store.mark_retired(self.db, record, self.clock())

    async def _sync_provider(
        self, current: UserKey, new_limit: Decimal | None, disabled: bool | None
    ) -> None:
        now = self.clock()
        base = current.limit_base_usd if current.limit_base_period == period_start(now) else Decimal(0)
        target = provider_limit(new_limit, base)
        if target != provider_limit(current.limit_usd, base):
            await self.provider.update_key(
                current.key_id, limit=target, limit_reset=None if target is None else "monthly"
            )
        if disabled is not None and disabled != current.disabled:
            await self.provider.update_key(current.key_id, disabled=disabled)

    async def _mint(
        self,
        user_id: str,
        version: int,
        limit: Decimal | None,
        request_id: str,
        spent: Decimal,
        kind: str,
    ) -> Minted | None:
        """Create the key of (user, version); None when a concurrent call with the same
        request_id made it first (the caller then answers with that call's result)."""
        deadline = self.clock() + self.minter.intent_timeout
        delay = 0.02
        while True:
            try:
                return await self.minter.mint(user_id, version, limit, request_id, spent, kind)
            except IntentBusy as busy:
                if busy.intent.request_id != request_id:
                    raise (KeyExists if kind == "provision" else ConcurrentRotation)(user_id) from None
                if busy.intent.state == "done":
                    return None
                if self.clock() >= deadline:
                    raise RequestInProgress(user_id) from None
            # The same request is in flight (a client retry racing its original): wait for it.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _commit_or_discard(self, minted: Minted, storing: Awaitable[bool]) -> bool:
        """Await the commit; if it loses or fails, delete the provider key we made."""
        try:
            stored = await storing
        except Exception:
            await self.minter.discard(minted)
            raise
        if not stored:
            await self.minter.discard(minted)
        return stored

    async def _made_by(self, user_id: str, request_id: str) -> tuple[str, KeyRecord] | None:
        """The key a request id made for this user, with the operation that made it
        ('provision' or 'rotate'); None if the request id made no key."""
        record = await keys_store.find_key_by_request(self.db, user_id, request_id)
        if record is None:
            return None
        intent = await intents_store.find(self.db, user_id, record.key_version)
        kind = intent.kind if intent is not None else ("provision" if record.key_version == 1 else "rotate")
        return kind, record

    async def _rotation_replay(self, user_id: str, request_id: str) -> Rotation | None:
        made = await self._made_by(user_id, request_id)
        if made is None:
            return None
        kind, record = made
        if kind != "rotate":
            raise _reused_request_id()
        previous = await keys_store.find_key(self.db, user_id, record.key_version - 1)
        assert previous is not None and previous.retire_at is not None
        return Rotation(record.key_id, record.key_version, previous.key_id, previous.retire_at)


def encode_page_token(user_id: str) -> str:
    return encode_token(user_id)


def decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        user_id = decode_token(token)
    except ValueError:
        user_id = ""
    if not USER_ID.fullmatch(user_id):
        raise InvalidArgument("page_token", "is not a token from a previous ListKeys response")
    return user_id
