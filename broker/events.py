"""Live key events: one hub per process learns of every committed key change and fans it out to
WatchKeys streams and in-process listeners, on every replica, within about a second.

Correctness rests on polling the change log (table key_events) every `poll_interval`. PostgreSQL
LISTEN/NOTIFY on one dedicated connection only makes the next poll happen at once; when LISTEN
cannot work (PgBouncer in transaction mode, a standby) the hub says so once and just polls.

A poll re-reads a lookback window behind the newest event time it has seen, because an event's
time is taken at insert and its transaction commits later: a row can become visible after rows
with later times. Event ids already delivered are remembered for that window and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

import asyncpg

from broker.db import UNREACHABLE, Database
from broker.errors import KeybrokerError, Unavailable
from broker.storage import events_store
from broker.storage.events_store import CHANNEL, KeyEvent

__all__ = ["KeyEvent", "KeyEventHub", "SubscriberLagging", "Subscription"]

log = logging.getLogger("keybroker.events")

Listener = Callable[[KeyEvent], None]
# A user id never contains "?" or spaces, so a payload with this prefix is the hub's own probe.
PROBE_PREFIX = "?probe "
# What ends a LISTEN session without saying anything about LISTEN itself: reconnect and retry.
CONNECTION_TROUBLE: tuple[type[BaseException], ...] = (*UNREACHABLE, KeybrokerError)


class SubscriberLagging(Unavailable):
    """The subscriber read too slowly and was dropped; it should subscribe again (and, since it
    missed events, treat everything it cached as stale)."""

    reason = "EVENTS_LAGGING"

    def __init__(self) -> None:
        super().__init__("the event stream fell too far behind; subscribe again", retry_after_seconds=0.1)


class Subscription:
    """One subscriber's events, oldest first: `async for event in subscription`.

    Ends (StopAsyncIteration) when closed or when the server drains; raises SubscriberLagging
    when more than `max_pending` events wait unread.
    """

    def __init__(self, hub: KeyEventHub, user_ids: frozenset[str] | None, max_pending: int) -> None:
        self.user_ids = user_ids
        self._hub = hub
        self._max_pending = max_pending
        # Unbounded on purpose: the bound is enforced in _offer, so the end marker always fits.
        self._queue: asyncio.Queue[KeyEvent | None] = asyncio.Queue()
        self._ended = False
        self._lagging = False

    def __repr__(self) -> str:
        users = "all" if self.user_ids is None else len(self.user_ids)
        return f"Subscription(users={users}, pending={self._queue.qsize()}, ended={self._ended})"

    @property
    def ended(self) -> bool:
        return self._ended

    def wants(self, event: KeyEvent) -> bool:
        return self.user_ids is None or event.user_id in self.user_ids

    def offer(self, event: KeyEvent) -> bool:
        """Queue `event`; False (and the subscription ends as lagging) when it is too far behind."""
        if self._ended:
            return False
        if self._queue.qsize() >= self._max_pending:
            self.finish(lagging=True)
            return False
        self._queue.put_nowait(event)
        return True

    def finish(self, *, lagging: bool = False) -> None:
        if self._ended:
            return
        self._ended, self._lagging = True, lagging
        if lagging:  # the backlog is worthless: the subscriber must resynchronise anyway
            while not self._queue.empty():
                self._queue.get_nowait()
        self._queue.put_nowait(None)

    def close(self) -> None:
        self._hub.unsubscribe(self)
        self.finish()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> KeyEvent:
        event = await self._queue.get()
        if event is None:
            self._queue.put_nowait(None)  # stay ended for any later read
            if self._lagging:
                raise SubscriberLagging
            raise StopAsyncIteration
        return event


class KeyEventHub:
    """Polls the key change log, woken early by NOTIFY, and fans events out. One per process."""

    def __init__(
        self,
        db: Database,
        *,
        poll_interval: float = 0.5,
        listen: bool = True,
        lookback: timedelta = timedelta(seconds=5),
        page_size: int = 500,
        max_pages_per_poll: int = 20,
        max_pending: int = 1024,
        keepalive: float = 15.0,
        probe_timeout: float = 5.0,
        max_reconnect_delay: float = 30.0,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.db = db
        self.poll_interval = poll_interval
        self.listen = listen
        self.lookback = lookback
        self.page_size = page_size
        self.max_pages_per_poll = max_pages_per_poll
        self.max_pending = max_pending
        self.keepalive = keepalive
        self.probe_timeout = probe_timeout
        self.max_reconnect_delay = max_reconnect_delay
        # True while notifications are known to arrive on the LISTEN connection.
        self.listening = False
        self.listen_pid: int | None = None  # server pid of the LISTEN connection
        self.polls = 0
        self._watermark: datetime | None = None
        self._resume: tuple[datetime, str] | None = None
        self._seen: dict[str, datetime] = {}
        self._subscriptions: set[Subscription] = set()
        self._listeners: list[Listener] = []
        self._wake = asyncio.Event()
        self._poll_lock = asyncio.Lock()
        self._probe: tuple[str, asyncio.Future[None]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        self._listen_failing = False

    def __repr__(self) -> str:
        return (
            f"KeyEventHub(listening={self.listening}, subscriptions={len(self._subscriptions)}, "
            f"listeners={len(self._listeners)})"
        )

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the database's clock as the starting point and begin polling (and listening)."""
        self._watermark = await events_store.database_now(self.db)
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="keybroker-events-poll"))
        if self.listen:
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="keybroker-events-listen"))

    def drain(self) -> None:
        """End every open subscription now, and any later one at once (the server is stopping)."""
        self._draining = True
        for subscription in list(self._subscriptions):
            subscription.finish()
        self._subscriptions.clear()

    async def close(self) -> None:
        self.drain()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- consumers ----------------------------------------------------------------------------

    def subscribe(self, user_ids: frozenset[str] | None = None) -> Subscription:
        """Events committed from now on, of `user_ids` only (None: every user)."""
        subscription = Subscription(self, user_ids, self.max_pending)
        if self._draining:
            subscription.finish()
        else:
            self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event)` for every event, in the hub's task (keep it quick, never block);
        e.g. to drop an in-process cache entry. Returns the function that removes it."""
        self._listeners.append(listener)
        return lambda: self.remove_listener(listener)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def wake(self) -> None:
        """Poll now instead of at the next interval."""
        self._wake.set()

    # -- polling ------------------------------------------------------------------------------

    async def poll(self) -> int:
        """Read events not yet delivered and deliver them; returns how many were new."""
        async with self._poll_lock:
            if self._watermark is None:
                self._watermark = await events_store.database_now(self.db)
            after, after_id = self._resume or (self._watermark - self.lookback, None)
            self._resume = None
            fresh = 0
            for _ in range(self.max_pages_per_poll):
                page = await events_store.events_after(self.db, after, after_id, self.page_size)
                fresh += self._deliver(page)
                if len(page) < self.page_size:
                    break
                after, after_id = page[-1].event_time, page[-1].event_id
            else:  # capped: continue from here at once, without re-reading the window
                self._resume = (after, after_id or "")
                self._wake.set()
            self._forget_old()
            self.polls += 1
            return fresh

    def _deliver(self, events: list[KeyEvent]) -> int:
        fresh = 0
        for event in events:
            if event.event_id in self._seen:
                continue
            self._seen[event.event_id] = event.event_time
            if self._watermark is None or event.event_time > self._watermark:
                self._watermark = event.event_time
            fresh += 1
            self._dispatch(event)
        return fresh

    def _dispatch(self, event: KeyEvent) -> None:
        for subscription in list(self._subscriptions):
            if subscription.ended:
                self._subscriptions.discard(subscription)
            elif subscription.wants(event) and not subscription.offer(event):
                self._subscriptions.discard(subscription)
                log.warning("a key event subscriber fell %d events behind; its stream ends", self.max_pending)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("key event listener failed")

    def _forget_old(self) -> None:
        if self._watermark is None:
            return
        horizon = self._watermark - self.lookback
        for event_id in [e for e, when in self._seen.items() if when < horizon]:
            del self._seen[event_id]

    async def _poll_loop(self) -> None:
        failing = False
        while True:
            self._wake.clear()
            try:
                await self.poll()
                if failing:
                    log.info("key events: polling works again")
                failing = False
            except KeybrokerError as exc:
                if not failing:
                    log.warning("key events: poll failed (%s); retrying", exc.reason)
                failing = True
            except Exception:
                if not failing:
                    log.exception("key events: poll failed; retrying")
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    # -- LISTEN -------------------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        """Keep one LISTEN connection open, reconnecting with jittered exponential backoff."""
        delay = 0.1
        while True:
            try:
                outcome = await self._listen_once()
            except Exception:
                log.exception("key events: the LISTEN task failed; retrying")
                outcome = "unreachable"
            if outcome == "impossible":
                return  # LISTEN does not work here: polling alone it is
            if outcome == "lost":
                delay = 0.1  # it worked until now: reconnect quickly
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.max_reconnect_delay)

    async def _listen_once(self) -> str:
        """Connect, LISTEN and hold the connection: "impossible", "unreachable" or "lost"."""
        listened = False
        try:
            conn = await self.db.connect_dedicated()
        except (*UNREACHABLE, asyncpg.PostgresError, KeybrokerError) as exc:
            return self._unreachable(exc)
        try:
            if not await self._listen_on(conn):
                return "impossible"
            listened, self._listen_failing = True, False
            await self._hold(conn)
            why = "closed"
        except CONNECTION_TROUBLE as exc:
            if not listened:
                return self._unreachable(exc)
            why = type(exc).__name__
        finally:
            self.listening, self.listen_pid = False, None
            await _close_quietly(conn)
        log.warning("key events: the LISTEN connection was lost (%s); reconnecting", why)
        return "lost"

    def _unreachable(self, exc: BaseException) -> str:
        if not self._listen_failing:
            log.warning("key events: cannot LISTEN (%s); retrying, polling meanwhile", type(exc).__name__)
        self._listen_failing = True
        return "unreachable"

    async def _listen_on(self, conn: asyncpg.Connection) -> bool:
        """LISTEN, then prove that a NOTIFY sent through the pool arrives here (behind PgBouncer in
        transaction mode LISTEN succeeds but nothing ever arrives). False: give up LISTEN."""
        try:
            await conn.add_listener(CHANNEL, self._on_notification)
        except UNREACHABLE:
            raise
        except asyncpg.PostgresError as exc:
            log.warning(
                "key events: LISTEN is not possible on this database (%s); relying on polling every %.1f s",
                type(exc).__name__,
                self.poll_interval,
            )
            return False
        nonce = secrets.token_hex(8)
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._probe = (nonce, arrived)
        try:
            await self.db.execute("SELECT pg_notify($1, $2)", CHANNEL, PROBE_PREFIX + nonce)
            await asyncio.wait_for(arrived, self.probe_timeout)
        except TimeoutError:
            log.warning(
                "key events: notifications do not arrive (PgBouncer in transaction mode?); "
                "relying on polling every %.1f s",
                self.poll_interval,
            )
            return False
        finally:
            self._probe = None
        self.listening, self.listen_pid = True, conn.get_server_pid()
        log.info("key events: listening on %s", CHANNEL)
        self.wake()  # catch up at once on anything committed while not listening
        return True

    async def _hold(self, conn: asyncpg.Connection) -> None:
        """Return when the connection is lost; a quiet connection is checked every `keepalive`."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        while not lost.is_set() and not conn.is_closed():
            try:
                await asyncio.wait_for(lost.wait(), self.keepalive)
            except TimeoutError:
                await conn.execute("SELECT 1", timeout=self.keepalive)

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload.startswith(PROBE_PREFIX):
            probe = self._probe
            if probe is not None and payload == PROBE_PREFIX + probe[0] and not probe[1].done():
                probe[1].set_result(None)
            return
        self._wake.set()


async def _close_quietly(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 2.0)
    except Exception:
        conn.terminate()
