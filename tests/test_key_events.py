"""Live key events (WatchKeys): every change reaches every replica's streams within a second, by
NOTIFY or, without it, by polling the change log; the client drops cached keys on events.

Every "within 1 s" is an `asyncio.wait_for(..., 1.0)` on the stream, started after the change's
RPC returned (that is, after it committed)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from keybroker_client import InvalidArgumentError, KeyBrokerClient, UnavailableError
from keybroker_client.cache import KeyCache

from broker.events import KeyEvent, KeyEventHub, SubscriberLagging
from broker.sandbox import Sandbox
from tests.conftest import Broker
from tests.helpers import assert_invalid_argument, assert_rpc_error, eventually
from tests.test_server_lifecycle import broker_env, read_until

WITHIN = 1.0  # the delivery promise, in seconds

# --- helpers -------------------------------------------------------------------------------------


class Watch:
    """A WatchKeys stream over a real channel, open once the server confirmed it."""

    def __init__(self, call: Any) -> None:
        self.call = call

    async def next(self, within: float = WITHIN) -> pb.KeyEvent:
        response = await asyncio.wait_for(self.call.read(), within)
        assert response is not grpc.aio.EOF, "the stream ended"
        event: pb.KeyEvent = response.event
        return event


@pytest.fixture
async def open_watches() -> AsyncIterator[list[Watch]]:
    watches: list[Watch] = []
    yield watches
    for watch in watches:
        watch.call.cancel()


async def watch(
    channel: grpc.aio.Channel, token: str, watches: list[Watch], users: tuple[str, ...] = ()
) -> Watch:
    call = pb_grpc.KeyBrokerStub(channel).WatchKeys(
        pb.WatchKeysRequest(user_ids=users), metadata=(("authorization", f"Bearer {token}"),)
    )
    opened = Watch(call)
    watches.append(opened)
    await asyncio.wait_for(call.initial_metadata(), 5)  # the subscription is live from here
    return opened


async def rotate(broker: Broker, user: str, request_id: str) -> pb.RotateKeyResponse:
    request = pb.RotateKeyRequest(
        user_id=user, request_id=request_id, grace_period=duration_pb2.Duration(seconds=0)
    )
    return await broker.agent.RotateKey(request, metadata=broker.as_agent(), timeout=10)


async def update(broker: Broker, user: str, **fields: Any) -> pb.KeyInfo:
    request = pb.UpdateKeyRequest(user_id=user, **fields)
    return (await broker.admin.UpdateKey(request, metadata=broker.as_admin(), timeout=10)).key


async def revoke(broker: Broker, user: str) -> pb.KeyInfo:
    request = pb.RevokeKeyRequest(user_id=user)
    return (await broker.admin.RevokeKey(request, metadata=broker.as_admin(), timeout=10)).key


async def settle(broker: Broker) -> None:
    """Let the hub deliver what is committed so far, so a stream opened next starts after it
    (an event committed just before a subscription may otherwise still reach it: at least once)."""
    await broker.server.events.poll()


def check_event(event: pb.KeyEvent, kind: int, user: str, key_id: str, version: int) -> None:
    assert (event.type, event.user_id, event.key_id, event.key_version) == (kind, user, key_id, version)
    assert uuid.UUID(event.event_id) and event.event_time.seconds > 0


# --- one replica -----------------------------------------------------------------------------------


async def test_every_kind_of_change_arrives_within_a_second_with_user_key_and_version(
    broker: Broker, open_watches: list[Watch]
) -> None:
    stream = await watch(broker.channel, broker.agent_token, open_watches)
    info = await broker.provision("alice", tier="free")
    check_event(await stream.next(), pb.KEY_EVENT_TYPE_PROVISIONED, "alice", info.key_id, 1)

    rotated = await rotate(broker, "alice", "rot-1")
    check_event(await stream.next(), pb.KEY_EVENT_TYPE_ROTATED, "alice", rotated.key_id, 2)

    await update(broker, "alice", monthly_limit_usd="3.5")
    check_event(await stream.next(), pb.KEY_EVENT_TYPE_LIMIT_CHANGED, "alice", rotated.key_id, 2)
    await update(broker, "alice", tier="standard")
    check_event(await stream.next(), pb.KEY_EVENT_TYPE_LIMIT_CHANGED, "alice", rotated.key_id, 2)

    await update(broker, "alice", disabled=True)
    check_event(await stream.next(), pb.KEY_EVENT_TYPE_DISABLED, "alice", rotated.key_id, 2)
    await update(broker, "alice", disabled=False)
    check_event(await stream.next(), pb.KEY_EVENT_TYPE_ENABLED, "alice", rotated.key_id, 2)

    await revoke(broker, "alice")
    check_event(await stream.next(), pb.KEY_EVENT_TYPE_REVOKED, "alice", rotated.key_id, 2)


async def test_the_user_filter_passes_only_the_listed_users(
    broker: Broker, open_watches: list[Watch]
) -> None:
    for user in ("alice", "bob", "carol"):
        await broker.provision(user)
    await settle(broker)
    only_bob = await watch(broker.channel, broker.agent_token, open_watches, ("bob", "nobody"))
    everyone = await watch(broker.channel, broker.agent_token, open_watches)

    await rotate(broker, "alice", "a-1")
    await rotate(broker, "bob", "b-1")
    await rotate(broker, "carol", "c-1")
    await rotate(broker, "bob", "b-2")
    assert [(e.user_id, e.key_version) for e in [await only_bob.next(), await only_bob.next()]] == [
        ("bob", 2),
        ("bob", 3),
    ]
    seen = [(e.user_id, e.key_version) for e in [await everyone.next() for _ in range(4)]]
    assert seen == [("alice", 2), ("bob", 2), ("carol", 2), ("bob", 3)]


async def test_a_bad_filter_or_caller_is_refused_with_the_usual_rich_status(broker: Broker) -> None:
    stub = broker.agent
    for users in (["ok", "not ok!"], ["ok", ""], [f"u{i}" for i in range(1001)]):
        call = stub.WatchKeys(pb.WatchKeysRequest(user_ids=users), metadata=broker.as_agent())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert_invalid_argument(refused.value, "user_ids")

    call = stub.WatchKeys(pb.WatchKeysRequest(), metadata=(("authorization", "Bearer nope"),))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert_rpc_error(refused.value, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


async def test_a_bug_in_a_stream_is_internal_and_logged(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(user_ids: frozenset[str] | None = None) -> Any:
        raise RuntimeError("secret-ish internals")

    monkeypatch.setattr(broker.server.events, "subscribe", broken)
    call = broker.agent.WatchKeys(pb.WatchKeysRequest(), metadata=broker.as_agent())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.INTERNAL
    assert refused.value.details() == "internal error"
    assert any("bug while serving /keybroker.v1.KeyBroker/WatchKeys" in r.message for r in caplog.records)


async def test_a_lagging_subscriber_is_dropped_with_unavailable(
    broker: Broker, open_watches: list[Watch]
) -> None:
    stream = await watch(broker.channel, broker.agent_token, open_watches)
    [subscription] = broker.server.events._subscriptions
    subscription.finish(lagging=True)
    with pytest.raises(grpc.aio.AioRpcError) as dropped:
        await stream.next()
    assert_rpc_error(dropped.value, grpc.StatusCode.UNAVAILABLE, "EVENTS_LAGGING")
    assert broker.server.events.subscriber_count == 0


async def test_draining_ends_open_streams_at_once(broker: Broker, open_watches: list[Watch]) -> None:
    stream = await watch(broker.channel, broker.agent_token, open_watches)
    # The grace is long: only ending the stream lets the drain finish quickly.
    await asyncio.wait_for(broker.server.stop(grace=30), 2.0)
    assert await asyncio.wait_for(stream.call.read(), 1.0) is grpc.aio.EOF
    assert await stream.call.code() == grpc.StatusCode.OK


# --- the hub itself: polling without notifications, late commits, reconnects --------------------


@pytest.fixture
async def polling_hub(broker: Broker) -> AsyncIterator[KeyEventHub]:
    hub = KeyEventHub(broker.runtime.db, poll_interval=0.5, listen=False)
    await hub.start()
    yield hub
    await hub.close()


async def next_event(subscription: AsyncIterator[KeyEvent], within: float = WITHIN) -> KeyEvent:
    return await asyncio.wait_for(anext(subscription), within)


async def test_without_notifications_polling_delivers_within_a_second(
    broker: Broker, polling_hub: KeyEventHub
) -> None:
    heard: list[KeyEvent] = []
    polling_hub.add_listener(heard.append)
    with polling_hub.subscribe(frozenset({"alice"})) as subscription:
        info = await broker.provision("alice")
        event = await next_event(subscription)
        assert (event.kind, event.user_id, event.key_id, event.key_version) == (
            "PROVISIONED",
            "alice",
            info.key_id,
            1,
        )
        rotated = await rotate(broker, "alice", "r-1")
        event = await next_event(subscription)
        assert (event.kind, event.key_id, event.key_version) == ("ROTATED", rotated.key_id, 2)
    assert not polling_hub.listening
    assert [e.kind for e in heard] == ["PROVISIONED", "ROTATED"], "in-process listeners hear every event"


async def test_an_event_that_commits_after_later_events_is_still_delivered_once(
    broker: Broker, polling_hub: KeyEventHub
) -> None:
    """event_time is taken at insert; a slow transaction commits after newer events were polled."""
    await broker.provision("fast")
    await polling_hub.poll()  # delivered before anyone subscribes
    conn = await broker.db()
    try:
        with polling_hub.subscribe() as subscription:
            slow = conn.transaction()
            await slow.start()
            await conn.execute("SELECT kb_key_event('slow', 'LIMIT_CHANGED', 'k-slow', 1)")
            await rotate(broker, "fast", "f-1")  # inserted later, committed first
            assert (await next_event(subscription)).user_id == "fast"
            await polling_hub.poll()  # the watermark is now past the uncommitted event
            await slow.commit()
            late = await next_event(subscription)
            assert (late.user_id, late.kind, late.key_id) == ("slow", "LIMIT_CHANGED", "k-slow")
            assert await polling_hub.poll() == 0, "re-reading the lookback window delivers nothing twice"
    finally:
        await conn.close()


async def test_a_subscriber_that_falls_behind_is_ended_as_lagging(broker: Broker) -> None:
    hub = KeyEventHub(broker.runtime.db, listen=False, max_pending=2)
    await hub.start()
    try:
        with hub.subscribe() as slow, hub.subscribe(frozenset({"someone-else"})) as idle:
            for user in ("a", "b", "c"):
                await broker.provision(user)
            await hub.poll()  # delivers all three (if the hub's own poll has not already)
            with pytest.raises(SubscriberLagging):
                await next_event(slow)
            assert hub.subscriber_count == 1 and idle in hub._subscriptions
    finally:
        await hub.close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) for a state change that no stream reports."""

    async def check() -> bool:
        return condition()

    await eventually(check, timeout=timeout)


async def test_the_listen_connection_comes_back_after_the_database_drops_it(
    broker: Broker, open_watches: list[Watch]
) -> None:
    hub = broker.server.events
    await until(lambda: hub.listening)
    old_pid = hub.listen_pid
    conn = await broker.db()
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", old_pid)
    finally:
        await conn.close()
    await until(lambda: hub.listening and hub.listen_pid not in (None, old_pid), timeout=10)
    stream = await watch(broker.channel, broker.agent_token, open_watches)
    await broker.provision("alice")
    assert (await stream.next()).user_id == "alice"


# --- the client library ----------------------------------------------------------------------------


async def test_start_key_watch_drops_a_cached_key_when_another_caller_rotates_it(broker: Broker) -> None:
    await broker.provision("alice")
    await settle(broker)
    heard: asyncio.Queue[pb.KeyEvent] = asyncio.Queue()
    async with KeyBrokerClient(broker.target, broker.agent_token) as client:
        await client.start_key_watch(["alice"], on_event=heard.put_nowait)
        first = await client.get_key_cached("alice")
        assert (await client.get_key_cached("alice")) is first, "served from the cache"

        rotated = await rotate(broker, "alice", "elsewhere-1")  # not through this client
        event = await asyncio.wait_for(heard.get(), WITHIN)
        assert (event.type, event.user_id, event.key_version) == (pb.KEY_EVENT_TYPE_ROTATED, "alice", 2)
        fresh = await client.get_key_cached("alice")
        assert (fresh.key_version, fresh.key_id) == (2, rotated.key_id) and fresh.api_key != first.api_key

        # The stream breaks (the broker dropped it as lagging): the client subscribes again.
        hub = broker.server.events
        [subscription] = hub._subscriptions
        subscription.finish(lagging=True)
        await until(lambda: hub.subscriber_count == 1 and subscription not in hub._subscriptions)
        await rotate(broker, "alice", "elsewhere-2")
        assert (await asyncio.wait_for(heard.get(), WITHIN)).key_version == 3
        assert (await client.get_key_cached("alice")).key_version == 3
        await client.stop_key_watch()
    await until(lambda: broker.server.events.subscriber_count == 0)


async def test_a_key_fetched_across_an_invalidation_is_not_cached() -> None:
    """GetKey in flight, then an event drops the user: the old key that GetKey returns must not
    be put back into the cache."""
    cache = KeyCache()
    async with cache.fetching("u"):
        generation = cache.generation("u")
        cache.invalidate("u")  # the event arrives while GetKey is in flight
        cache.put("u", pb.GetKeyResponse(key_version=1), generation)
    assert cache.get("u") is None
    async with cache.fetching("u"):
        cache.put("u", pb.GetKeyResponse(key_version=2), cache.generation("u"))
    cached = cache.get("u")
    assert cached is not None and cached.key_version == 2


async def test_watch_keys_streams_key_events_and_refuses_a_bad_filter(broker: Broker) -> None:
    async with KeyBrokerClient(broker.target, broker.agent_token) as client:
        stream = await client.watch_keys(["bob"])
        async with stream:
            info = await broker.provision("bob")
            event = await asyncio.wait_for(anext(stream), WITHIN)
            assert (event.type, event.key_id) == (pb.KEY_EVENT_TYPE_PROVISIONED, info.key_id)
        assert [e async for e in stream] == [], "a closed stream ends"
        with pytest.raises(InvalidArgumentError) as refused:
            await client.watch_keys(["bad id"])
        assert refused.value.field_violations[0][0] == "user_ids"

    async with KeyBrokerClient("127.0.0.1:1", broker.agent_token, timeout=1) as offline:
        with pytest.raises(UnavailableError):
            await offline.watch_keys()


# --- two broker processes on one database ----------------------------------------------------------


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    channel: grpc.aio.Channel
    logs: list[str]


@pytest.fixture
async def replica(broker: Broker, sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[Replica]:
    """A second broker: `python -m broker serve` on the same database and sandbox."""
    env = broker_env(tmp_path / "replica")
    env.update(
        KEYBROKER_DATABASE_URL=str(broker.runtime.settings.database_url),
        KEYBROKER_MASTER_KEY=str(broker.runtime.settings.master_key),
        OPENROUTER_MANAGEMENT_KEY=sandbox.management_key,
        OPENROUTER_BASE_URL=str(sandbox.base_url),
        KEYBROKER_LISTEN="127.0.0.1:0",
        KEYBROKER_LOG_FORMAT="text",
        KEYBROKER_TOKEN_CACHE_SECONDS="0",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    logs: list[str] = []
    drain: asyncio.Task[None] | None = None
    try:
        port = int((await read_until(process.stderr, r"listening on port (\d+)", logs)).group(1))
        drain = asyncio.create_task(_collect(process.stderr, logs))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Replica(process, channel, logs)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if drain is not None:
            await drain


async def _collect(stream: asyncio.StreamReader, logs: list[str]) -> None:
    while line := await stream.readline():
        logs.append(line.decode())


async def test_a_change_on_one_replica_reaches_streams_on_the_other_within_a_second(
    broker: Broker, replica: Replica, open_watches: list[Watch]
) -> None:
    on_b = await watch(replica.channel, broker.agent_token, open_watches)
    on_a = await watch(broker.channel, broker.agent_token, open_watches)

    info = await broker.provision("alice")  # made on A
    check_event(await on_b.next(), pb.KEY_EVENT_TYPE_PROVISIONED, "alice", info.key_id, 1)
    assert (await on_a.next()).event_id  # and A's own streams too

    b_agent = pb_grpc.KeyBrokerStub(replica.channel)
    rotated = await b_agent.RotateKey(  # made on B
        pb.RotateKeyRequest(user_id="alice", request_id="on-b"), metadata=broker.as_agent(), timeout=10
    )
    check_event(await on_a.next(), pb.KEY_EVENT_TYPE_ROTATED, "alice", rotated.key_id, 2)
    check_event(await on_b.next(), pb.KEY_EVENT_TYPE_ROTATED, "alice", rotated.key_id, 2)

    # SIGTERM with a stream open: B ends the stream and exits well within its 10 s grace.
    replica.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(on_b.call.read(), 3) is grpc.aio.EOF
    assert await asyncio.wait_for(replica.process.wait(), 5) == 0
    assert not [line for line in replica.logs if "Traceback" in line or " ERROR " in line], replica.logs


async def test_rotate_or_revoke_on_one_replica_is_seen_by_the_other_at_once(
    broker: Broker, replica: Replica
) -> None:
    b_agent = pb_grpc.KeyBrokerStub(replica.channel)

    async def get_key_on_b() -> pb.GetKeyResponse:
        return await b_agent.GetKey(pb.GetKeyRequest(user_id="alice"), metadata=broker.as_agent(), timeout=5)

    await broker.provision("alice")
    assert (await get_key_on_b()).key_version == 1
    rotated = await rotate(broker, "alice", "on-a")
    key = await get_key_on_b()
    assert (key.key_version, key.key_id) == (2, rotated.key_id)

    await revoke(broker, "alice")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await get_key_on_b()
    assert_rpc_error(refused.value, grpc.StatusCode.FAILED_PRECONDITION, "KEY_DISABLED")


async def test_settings_read_the_poll_interval() -> None:
    from datetime import timedelta

    from broker.config import ConfigError, load_settings

    assert load_settings({}).event_poll_interval == timedelta(milliseconds=500)
    assert load_settings({"KEYBROKER_EVENT_POLL_INTERVAL": "250ms"}).event_poll_interval == timedelta(
        milliseconds=250
    )
    with pytest.raises(ConfigError, match="KEYBROKER_EVENT_POLL_INTERVAL"):
        load_settings({"KEYBROKER_EVENT_POLL_INTERVAL": "0"})
