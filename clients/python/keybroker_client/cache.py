"""An in-process cache of users' keys, so the hot path does not call GetKey for every completion.

Every GetKey is a disclosure the broker audits, so the cache also makes concurrent misses for one
user share a single GetKey. An entry is current while its ``key_version`` matches the version that
CheckLimit reports; rotation bumps the version, and a 401 from OpenRouter invalidates the entry.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from keybroker.v1 import keybroker_pb2


class KeyCache:
    """Least-recently-used map of user id → ``GetKeyResponse``, bounded to ``max_entries``."""

    def __init__(self, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._entries: OrderedDict[str, keybroker_pb2.GetKeyResponse] = OrderedDict()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        # Invalidations per user while a fetch is in flight: a GetKey that started before an
        # invalidation may return the old key, and must not put it back (see ``put``).
        self._invalidations: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        # Never the entries: they hold the secrets.
        return f"KeyCache(entries={len(self._entries)}, max_entries={self._max_entries})"

    def get(self, user_id: str, current_version: int | None = None) -> keybroker_pb2.GetKeyResponse | None:
        """The cached key, unless there is none or ``current_version`` says it is stale."""
        entry = self._entries.get(user_id)
        if entry is None:
            return None
        if current_version is not None and entry.key_version != current_version:
            del self._entries[user_id]
            return None
        self._entries.move_to_end(user_id)
        return entry

    def generation(self, user_id: str) -> int:
        """Take before fetching; pass to ``put`` (only meaningful inside ``fetching``)."""
        return self._invalidations.get(user_id, 0)

    def put(self, user_id: str, key: keybroker_pb2.GetKeyResponse, generation: int | None = None) -> None:
        """Cache ``key``, unless the user was invalidated since ``generation`` was taken."""
        if generation is not None and self._invalidations.get(user_id, 0) != generation:
            return
        self._entries[user_id] = key
        self._entries.move_to_end(user_id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def invalidate(self, user_id: str) -> None:
        self._entries.pop(user_id, None)
        if user_id in self._locks:
            self._invalidations[user_id] = self._invalidations.get(user_id, 0) + 1

    def clear(self) -> None:
        self._entries.clear()
        for user_id in self._locks:
            self._invalidations[user_id] = self._invalidations.get(user_id, 0) + 1

    @asynccontextmanager
    async def fetching(self, user_id: str) -> AsyncIterator[None]:
        """Serialise fetches of one user's key; the lock is dropped when nobody holds or awaits it."""
        lock, users = self._locks.get(user_id) or (asyncio.Lock(), 0)
        self._locks[user_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[user_id]
            if users == 1:
                del self._locks[user_id]
                self._invalidations.pop(user_id, None)
            else:
                self._locks[user_id] = (lock, users - 1)
