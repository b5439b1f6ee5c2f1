"""A lean pool of asyncpg connections: what the broker needs, and no per-call tasks.

asyncpg's own Pool starts an asyncio task for every acquire with a timeout (wait_for) and for
every release (shield), and wraps each connection in a proxy whose every method call is
forwarded. On the hot path, where each RPC is one statement, that cost 56-59 µs of client CPU per
`SELECT $1` against 22-24 µs here (`make bench-sql`, 32 callers; issue 6). Here an idle connection
is handed out and taken back with no task and no proxy; waiting for a busy pool costs one future
and one timer.

What is kept from asyncpg's pool: at most `max_size` connections, opened when needed (`min_size`
at start); a connection whose state is unknown (still inside a transaction, or given back after
anything but a plain SQL error, e.g. a cancelled or timed-out statement) is closed, never reused
(in the background, so that a statement cancelled on it is first stopped on the server), and one
found closed is dropped; connections idle for longer than `max_idle_seconds` are closed down to
`min_size`; close() waits for the connections in use. Waiters are served first come, first served.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable

import asyncpg

Connect = Callable[[], Awaitable[asyncpg.Connection]]
CLOSE_SECONDS = 5.0  # for closing one connection gracefully before it is aborted


class PoolClosed(asyncpg.InterfaceError):
    """The pool is closing: no more connections are handed out."""


class ConnectionPool:
    def __init__(
        self, connect: Connect, min_size: int, max_size: int, max_idle_seconds: float = 60.0
    ) -> None:
        if max_size < 1 or min_size < 0:
            raise ValueError("need max_size >= 1 and min_size >= 0")
        self._connect = connect
        self.min_size = min(min_size, max_size)
        self.max_size = max_size
        self.max_idle_seconds = max_idle_seconds
        # Idle connections with the loop time they were given back; the newest is reused first,
        # so the oldest ones age out when the load drops.
        self._idle: deque[tuple[asyncpg.Connection, float]] = deque()
        # A waiter gets a connection, or None: "a slot is free, open a connection yourself".
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._size = 0  # open connections, ones being opened, and slots handed to waiters
        self._open_connections: set[asyncpg.Connection] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._closing = False
        self._emptied = asyncio.Event()

    async def start(self) -> None:
        """Open `min_size` connections now: a wrong address or password fails here, at start."""
        opened: list[asyncpg.Connection] = []
        try:
            for _ in range(self.min_size):
                opened.append(await self._open())
        finally:  # on failure too, so that close() does not wait for them
            for conn in opened:
                self.release(conn)

    def get_size(self) -> int:
        return self._size

    def get_idle_size(self) -> int:
        return len(self._idle)

    async def acquire(self, wait_seconds: float) -> asyncpg.Connection:
        """A connection for the caller alone until `release`; TimeoutError after `wait_seconds`
        of waiting for a busy pool."""
        if self._closing:
            raise PoolClosed("the connection pool is closing")
        while self._idle:
            conn, _ = self._idle.pop()
            if not conn.is_closed():
                return conn
            self._forget(conn)  # died while idle (server restart, network)
            if self._waiters:  # a waiter was just given the freed slot; queue behind it
                break
        if self._size < self.max_size:
            return await self._open()
        return await self._wait(wait_seconds)

    def release(self, conn: asyncpg.Connection, reusable: bool = True) -> None:
        """Give `conn` back. With reusable=False (the caller saw it fail in a way that may leave
        it mid-statement) it is closed, and its slot then goes to the next waiter."""
        if conn.is_closed():
            self._forget(conn)
            return
        if not reusable or self._closing or conn.is_in_transaction():
            self._retire(conn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        now = asyncio.get_running_loop().time()
        self._idle.append((conn, now))
        self._close_one_stale(now)

    async def close(self, grace_seconds: float = 10.0) -> None:
        """Refuse new work, close idle connections, wait up to `grace_seconds` for the ones in use to
        come back (they are closed as they do), then terminate whatever is left."""
        self._closing = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosed("the connection pool is closing"))
        while self._idle:
            self._retire(self._idle.pop()[0])
        if self._size > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), grace_seconds)
        for conn in list(self._open_connections):
            self._forget(conn)

    # -- internals ----------------------------------------------------------------------------

    async def _open(self, slot_reserved: bool = False) -> asyncpg.Connection:
        if not slot_reserved:
            self._size += 1
        try:
            conn = await self._connect()
        except BaseException:
            self._give_slot_back()
            raise
        self._open_connections.add(conn)
        return conn

    async def _wait(self, wait_seconds: float) -> asyncpg.Connection:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[asyncpg.Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(wait_seconds, _expire, waiter)
        try:
            conn = await waiter
        except asyncio.CancelledError:
            # Cancelled just as a connection was handed over: pass it on, do not leak it.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()
                if handed is not None:
                    self.release(handed)
                else:
                    self._give_slot_back()
            raise
        finally:
            timer.cancel()
        return conn if conn is not None else await self._open(slot_reserved=True)

    def _forget(self, conn: asyncpg.Connection) -> None:
        conn.terminate()
        self._open_connections.discard(conn)
        self._give_slot_back()

    def _retire(self, conn: asyncpg.Connection) -> None:
        """Close `conn` in the background, keeping its slot until it is gone. A statement that
        was cancelled on it is stopped on the server first (asyncpg sends the cancel request when
        the caller is cancelled; terminating at once would drop that request and leave the
        statement running)."""
        task = asyncio.get_running_loop().create_task(self._close_gracefully(conn))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_gracefully(self, conn: asyncpg.Connection) -> None:
        try:
            with contextlib.suppress(Exception):  # close() has aborted the connection then
                await conn.close(timeout=CLOSE_SECONDS)
        finally:
            self._open_connections.discard(conn)
            self._give_slot_back()

    def _give_slot_back(self) -> None:
        """One connection (or reserved slot) fewer: the first live waiter gets the slot, reserved
        for it, and opens a connection in it."""
        self._size -= 1
        if self._closing:
            if self._size <= 0:
                self._emptied.set()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._size += 1
                waiter.set_result(None)
                return

    def _close_one_stale(self, now: float) -> None:
        """Close the longest-idle connection if it has idled too long (one per release: O(1))."""
        if self._size <= self.min_size or not self._idle:
            return
        conn, since = self._idle[0]
        if now - since > self.max_idle_seconds:
            self._idle.popleft()
            self._retire(conn)


def _expire(waiter: asyncio.Future[asyncpg.Connection | None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("timed out waiting for a database connection"))
