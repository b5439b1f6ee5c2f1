"""Live key events: the ``WatchKeys`` stream, and the background task that keeps the key cache honest.

The broker streams a ``KeyEvent`` for every rotation, revocation, suspension, resumption and limit
change, whichever replica made it. A client that caches keys subscribes, drops the cached key of
each user an event names, and subscribes again whenever the stream ends (the broker drains on
restart) or fails. Events sent while no stream was open are lost, so every (re)subscription also
drops the cached keys it covers.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, NoReturn

import grpc
from keybroker.v1 import keybroker_pb2

from .cache import KeyCache
from .errors import KeybrokerClientError, UnavailableError, from_rpc_error

__all__ = ["KeyEventStream", "run_key_watch", "user_filter"]

log = logging.getLogger("keybroker_client.watch")

KeyEventCallback = Callable[[keybroker_pb2.KeyEvent], object]
# Opens a WatchKeys stream for a user filter; returns once the broker confirms it is live.
OpenStream = Callable[[frozenset[str] | None], Awaitable["KeyEventStream"]]


def user_filter(user_ids: Iterable[str] | None) -> frozenset[str] | None:
    """The WatchKeys filter: None for every user."""
    if isinstance(user_ids, str):
        raise TypeError("user_ids must be a collection of user ids, not one str")
    return None if user_ids is None else frozenset(user_ids)


def raise_translated(err: grpc.aio.AioRpcError, token: str) -> NoReturn:
    error = from_rpc_error(err, secrets=(token,))
    # Keep the gRPC error as the cause for debugging, unless it could reveal the token.
    raise error from (None if token in repr(err) else err)


class KeyEventStream:
    """One open ``WatchKeys`` call: ``async for event in stream`` yields ``KeyEvent`` messages.

    Iteration ends when the broker drains or the stream is closed; it raises ``UnavailableError``
    when the connection breaks or this reader falls too far behind. Either way, subscribe again.
    """

    def __init__(self, call: Any, token: str) -> None:
        self._call = call
        self._token = token
        self._closed = False

    def __repr__(self) -> str:
        return f"KeyEventStream(closed={self._closed})"

    @classmethod
    async def open(cls, call: Any, token: str, confirm_within: float) -> KeyEventStream:
        """Wait (up to ``confirm_within`` seconds) until the broker confirms the subscription."""
        stream = cls(call, token)
        try:
            await asyncio.wait_for(call.initial_metadata(), confirm_within)
            if call.done():  # refused before it started (bad filter, bad token...)
                await stream._raise_status()
        except TimeoutError:
            stream.close()
            raise UnavailableError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "DEADLINE_EXCEEDED",
                f"the broker did not confirm the subscription within {confirm_within} s",
            ) from None
        except grpc.aio.AioRpcError as err:
            stream.close()
            raise_translated(err, token)
        except BaseException:
            stream.close()
            raise
        return stream

    async def _raise_status(self) -> None:
        code = await self._call.code()
        if code != grpc.StatusCode.OK:
            raise grpc.aio.AioRpcError(
                code,
                await self._call.initial_metadata(),
                await self._call.trailing_metadata(),
                await self._call.details(),
            )

    def close(self) -> None:
        """Cancel the call; iteration then ends. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._call.cancel()

    async def __aenter__(self) -> KeyEventStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __aiter__(self) -> KeyEventStream:
        return self

    async def __anext__(self) -> keybroker_pb2.KeyEvent:
        if self._closed:
            raise StopAsyncIteration
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as err:
            if self._closed:
                raise StopAsyncIteration from None
            raise_translated(err, self._token)
        except asyncio.CancelledError:
            if self._closed:
                raise StopAsyncIteration from None
            raise
        if response is grpc.aio.EOF:
            raise StopAsyncIteration
        event: keybroker_pb2.KeyEvent = response.event
        return event


async def run_key_watch(
    open_stream: OpenStream,
    cache: KeyCache,
    users: frozenset[str] | None,
    stream: KeyEventStream | None,
    on_event: KeyEventCallback | None = None,
    *,
    min_delay: float = 0.1,
    max_delay: float = 10.0,
) -> None:
    """Forever: drop the cached key of each event's user; when the stream ends or fails,
    subscribe again with jittered exponential backoff. ``stream`` is an already open first one."""
    delay = min_delay
    while True:
        if stream is None:
            try:
                stream = await open_stream(users)
            except KeybrokerClientError as exc:
                log.warning("key watch: cannot subscribe (%s); retrying in %.1f s", exc.reason, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, max_delay)
                continue
            forget(cache, users)  # events sent while no stream was open are lost
        try:
            async for event in stream:
                delay = min_delay
                cache.invalidate(event.user_id)
                if on_event is not None:
                    _call_quietly(on_event, event)
            log.info("key watch: the stream ended (broker draining); subscribing again")
        except KeybrokerClientError as exc:
            log.info("key watch: the stream failed (%s); subscribing again", exc.reason)
        finally:
            stream.close()
            forget(cache, users)  # blind until subscribed again: trust nothing cached meanwhile
        stream = None
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, max_delay)


def forget(cache: KeyCache, users: frozenset[str] | None) -> None:
    """Drop the cached keys a subscription covers."""
    if users is None:
        cache.clear()
        return
    for user_id in users:
        cache.invalidate(user_id)


def _call_quietly(callback: KeyEventCallback, event: keybroker_pb2.KeyEvent) -> None:
    try:
        callback(event)
    except Exception:
        log.exception("key watch: the on_event callback failed")
