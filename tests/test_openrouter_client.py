"""OpenRouterClient against the sandbox over real HTTP: happy paths and every error mapping."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest

from broker.errors import ProviderError, ProviderKeyNotFound, ProviderRejected, ProviderUnavailable
from broker.openrouter import CreatedKey, OpenRouterClient, ProviderKey, _retry_delay, dumps_json
from broker.sandbox import Fault, Sandbox
from broker.sandbox.state import NewKey

MANAGEMENT_KEY = "client-test-management-key"
HELLO = {"model": "sandbox/test", "messages": [{"role": "user", "content": "hello world!"}]}


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    sandbox = Sandbox(MANAGEMENT_KEY)
    await sandbox.start()
    yield sandbox
    await sandbox.stop()


def base_url(sandbox: Sandbox) -> str:
    assert sandbox.base_url is not None
    return sandbox.base_url


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[OpenRouterClient]:
    async with OpenRouterClient(base_url(sandbox), MANAGEMENT_KEY, timeout_seconds=5) as client:
        yield client


@pytest.fixture
async def no_retry(sandbox: Sandbox) -> AsyncIterator[OpenRouterClient]:
    """A client that reports the first failure, so mapping tests need no backoff."""
    async with OpenRouterClient(base_url(sandbox), MANAGEMENT_KEY, max_retries=0) as client:
        yield client


async def chat_status(sandbox: Sandbox, secret: str) -> int:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            base_url(sandbox) + "/chat/completions",
            json=HELLO,
            headers={"Authorization": f"Bearer {secret}"},
        )
    return response.status_code


# --- happy paths ---------------------------------------------------------------------------------


async def test_create_key_returns_secret_that_works_and_exact_limit(
    client: OpenRouterClient, sandbox: Sandbox
) -> None:
    limit = Decimal("12.345678901234567891")  # more digits than a float can carry
    created = await client.create_key("user-1", limit)
    assert re.fullmatch(r"sk-or-v1-[0-9a-f]{64}", created.secret)
    assert created.key.name == "user-1" and created.key.limit == limit
    assert created.key.limit_reset == "monthly" and created.key.limit_remaining == limit
    assert created.key.usage == 0 and created.key.usage_monthly == 0
    assert sandbox.state.get_key(created.key.hash).limit == limit
    assert await chat_status(sandbox, created.secret) == 200


async def test_unlimited_key_sends_no_limit_and_no_reset(client: OpenRouterClient) -> None:
    created = await client.create_key("unlimited", None)
    assert (created.key.limit, created.key.limit_reset, created.key.limit_remaining) == (None, None, None)


async def test_get_update_and_delete(client: OpenRouterClient, sandbox: Sandbox) -> None:
    created = await client.create_key("user-1", Decimal(10))
    key_hash = created.key.hash
    assert await client.get_key(key_hash) == created.key
    raised = await client.update_key(key_hash, limit=Decimal("20.5"))
    assert (raised.limit, raised.limit_reset, raised.updated_at is not None) == (
        Decimal("20.5"),
        "monthly",
        True,
    )
    disabled = await client.update_key(key_hash, disabled=True, name="user-1-suspended")
    assert (disabled.disabled, disabled.name, disabled.limit) == (True, "user-1-suspended", Decimal("20.5"))
    assert await chat_status(sandbox, created.secret) == 401
    uncapped = await client.update_key(key_hash, limit=None, disabled=False)
    assert (uncapped.limit, uncapped.limit_remaining, uncapped.disabled) == (None, None, False)
    assert uncapped.limit_reset == "monthly"  # left alone: not sent
    await client.delete_key(key_hash)
    with pytest.raises(ProviderKeyNotFound) as caught:
        await client.get_key(key_hash)
    assert caught.value.http_status == 404
    with pytest.raises(ProviderKeyNotFound):
        await client.delete_key(key_hash)


async def test_list_pages_past_100_and_include_disabled(client: OpenRouterClient, sandbox: Sandbox) -> None:
    keys = [sandbox.state.create_key(NewKey(name=f"k{i:03}")) for i in range(205)]
    for key in keys[:3]:
        key.disabled = True
    first = await client.list_keys()
    assert len(first) == 100 and first[0].name == "k204"  # most recent first
    assert len(await client.list_keys(offset=200, include_disabled=True)) == 5
    everything = await client.list_all_keys()
    assert len(everything) == 205 and {k.hash for k in everything} == {k.hash for k in keys}
    enabled = await client.list_all_keys(include_disabled=False)
    assert len(enabled) == 202 and not any(k.disabled for k in enabled)


async def test_find_keys_by_name_covers_all_pages_and_disabled_keys(
    client: OpenRouterClient, sandbox: Sandbox
) -> None:
    wanted = sandbox.state.create_key(NewKey(name="user-7:v1"))
    wanted.disabled = True
    for i in range(150):
        sandbox.state.create_key(NewKey(name=f"other-{i}"))
    twin = sandbox.state.create_key(NewKey(name="user-7:v1"))
    gone = sandbox.state.create_key(NewKey(name="user-7:v1"))
    sandbox.state.delete_key(gone.hash)
    found = await client.find_keys_by_name("user-7:v1")
    assert sorted(k.hash for k in found) == sorted([wanted.hash, twin.hash])
    assert await client.find_keys_by_name("nobody") == []


async def test_chat_usage_moves_usage_monthly_and_limit_remaining(
    client: OpenRouterClient, sandbox: Sandbox
) -> None:
    created = await client.create_key("spender", Decimal(1))
    assert await chat_status(sandbox, created.secret) == 200
    key = await client.get_key(created.key.hash)
    assert key.usage_monthly == Decimal("0.000035") and key.limit_remaining == Decimal("0.999965")
    info = await client.get_current_key_info(created.secret)
    assert info["is_management_key"] is False and info["usage_monthly"] == Decimal("0.000035")
    assert (await client.get_current_key_info(MANAGEMENT_KEY))["is_management_key"] is True


# --- error mapping -----------------------------------------------------------------------------


async def test_wrong_management_key_is_rejected_401(sandbox: Sandbox) -> None:
    async with OpenRouterClient(base_url(sandbox), "not-the-key", max_retries=0) as client:
        with pytest.raises(ProviderRejected) as caught:
            await client.list_keys()
    assert caught.value.http_status == 401
    assert str(caught.value) == "OpenRouter rejected the management key (401)"
    assert caught.value.metadata == {"http_status": "401", "error_type": "authentication"}


async def test_inference_key_as_management_key_is_rejected_403(
    client: OpenRouterClient, sandbox: Sandbox
) -> None:
    created = await client.create_key("user-1", None)
    async with OpenRouterClient(base_url(sandbox), created.secret, max_retries=0) as impostor:
        with pytest.raises(ProviderRejected) as caught:
            await impostor.list_keys()
    assert caught.value.http_status == 403 and created.secret not in str(caught.value)


async def test_deleted_user_key_is_rejected_by_key_info(client: OpenRouterClient) -> None:
    created = await client.create_key("user-1", None)
    await client.delete_key(created.key.hash)
    with pytest.raises(ProviderRejected) as caught:
        await client.get_current_key_info(created.secret)
    assert caught.value.http_status == 401
    assert str(caught.value) == "OpenRouter rejected the API key (401)"


@pytest.mark.parametrize(
    ("status", "error"), [(500, ProviderUnavailable), (503, ProviderUnavailable), (402, ProviderRejected)]
)
async def test_status_faults_map_to_domain_errors(
    no_retry: OpenRouterClient, sandbox: Sandbox, status: int, error: type[ProviderError]
) -> None:
    sandbox.faults.add(Fault(path_prefix="/api/v1/keys", status=status))
    with pytest.raises(error) as caught:
        await no_retry.list_keys()
    assert caught.value.http_status == status
    assert type(caught.value) is error


async def test_429_carries_retry_after(no_retry: OpenRouterClient, sandbox: Sandbox) -> None:
    sandbox.faults.add(Fault(status=429, retry_after="7"))
    sandbox.faults.add(Fault(status=429))
    with pytest.raises(ProviderUnavailable) as with_header:
        await no_retry.get_key("0" * 64)
    with pytest.raises(ProviderUnavailable) as without_header:
        await no_retry.get_key("0" * 64)
    assert (with_header.value.http_status, with_header.value.retry_after_seconds) == (429, 7.0)
    assert (without_header.value.http_status, without_header.value.retry_after_seconds) == (429, 1.0)


async def test_400_and_404_and_unexpected_status(no_retry: OpenRouterClient, sandbox: Sandbox) -> None:
    with pytest.raises(ProviderRejected) as bad_request:
        await no_retry.create_key("", None)
    assert bad_request.value.http_status == 400
    with pytest.raises(ProviderKeyNotFound):
        await no_retry.update_key("f" * 64, disabled=True)
    sandbox.faults.add(Fault(status=409))
    with pytest.raises(ProviderUnavailable) as conflict:
        await no_retry.list_keys()
    assert conflict.value.http_status == 409


async def test_timeout_maps_to_unavailable(sandbox: Sandbox) -> None:
    sandbox.faults.add(Fault(method="GET", path_prefix="/api/v1/keys", delay_seconds=2))
    async with OpenRouterClient(
        base_url(sandbox), MANAGEMENT_KEY, timeout_seconds=0.1, max_retries=0
    ) as client:
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable) as caught:
            await client.list_keys()
    assert time.monotonic() - started < 1.5
    assert caught.value.http_status is None and str(caught.value) == "OpenRouter did not answer in time"


async def test_lost_create_response_is_unavailable_but_the_key_exists(
    client: OpenRouterClient, sandbox: Sandbox
) -> None:
    sandbox.faults.add(Fault(method="POST", path_prefix="/api/v1/keys", drop_response=True))
    with pytest.raises(ProviderUnavailable) as caught:
        await client.create_key("user-9:v1", Decimal(5))
    assert str(caught.value) == "OpenRouter could not be reached"
    found = await client.find_keys_by_name("user-9:v1")
    assert len(found) == 1 and found[0].limit == Decimal(5)


async def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before the client connects
    async with OpenRouterClient(f"http://127.0.0.1:{port}/api/v1", MANAGEMENT_KEY, max_retries=0) as client:
        with pytest.raises(ProviderUnavailable) as caught:
            await client.get_key("0" * 64)
    assert caught.value.http_status is None and caught.value.code.name == "UNAVAILABLE"


# --- retries --------------------------------------------------------------------------------------


async def test_get_is_retried_after_one_500(client: OpenRouterClient, sandbox: Sandbox) -> None:
    created = await client.create_key("user-1", None)
    sandbox.faults.add(Fault(method="GET", path_prefix="/api/v1/keys/", status=500))
    assert (await client.get_key(created.key.hash)).hash == created.key.hash
    assert sandbox.faults.pending() == []  # the fault did fire


async def test_retries_give_up_after_max_retries(client: OpenRouterClient, sandbox: Sandbox) -> None:
    sandbox.faults.add(Fault(method="PATCH", status=502, times=3))
    with pytest.raises(ProviderUnavailable) as caught:
        await client.update_key("0" * 64, disabled=True)
    assert caught.value.http_status == 502 and sandbox.faults.pending() == []


async def test_retry_honours_retry_after(client: OpenRouterClient, sandbox: Sandbox) -> None:
    sandbox.faults.add(Fault(method="GET", status=429, retry_after="0.6"))
    started = time.monotonic()
    assert await client.list_keys() == []
    assert time.monotonic() - started >= 0.6  # the plain backoff would have been 0.2 s


async def test_create_is_never_retried(client: OpenRouterClient, sandbox: Sandbox) -> None:
    sandbox.faults.add(Fault(method="POST", status=500))
    with pytest.raises(ProviderUnavailable):
        await client.create_key("user-1", None)
    assert sandbox.state.all_keys() == []


def test_retry_delay_backs_off_and_caps_retry_after() -> None:
    assert [_retry_delay(attempt, None) for attempt in range(5)] == [0.2, 0.5, 1.0, 2.0, 2.0]
    limited = httpx.Response(429, headers={"Retry-After": "3600"})
    assert _retry_delay(0, limited) == 5.0
    assert _retry_delay(1, httpx.Response(503, headers={"Retry-After": "soon"})) == 0.5


# --- secrets and money ------------------------------------------------------------------------------


async def test_secret_never_in_repr_or_str(client: OpenRouterClient) -> None:
    created = await client.create_key("user-1", Decimal(1))
    assert created.secret not in repr(created) and created.secret not in str(created)
    assert "secret" not in repr(created)
    assert MANAGEMENT_KEY not in repr(client)
    errors: list[ProviderError] = []
    await client.delete_key(created.key.hash)
    for call in (client.get_current_key_info(created.secret), client.get_key(created.key.hash)):
        try:
            await call
        except ProviderError as caught:
            errors.append(caught)
    assert len(errors) == 2
    for failure in errors:
        text = f"{failure!s} {failure!r} {failure.metadata}"
        assert created.secret not in text and MANAGEMENT_KEY not in text


def test_created_key_repr_hides_secret() -> None:
    key = ProviderKey.from_json({"hash": "ab" * 32, "name": "n"})
    created = CreatedKey(key=key, secret="sk-or-v1-" + "9" * 64)
    assert "9" * 64 not in repr(created) and "9" * 64 not in str(created)


def test_provider_key_parses_missing_and_null_counters_as_zero() -> None:
    key = ProviderKey.from_json(
        {"hash": "h", "name": "n", "usage": None, "limit": 5, "limit_remaining": Decimal("4.5")}
    )
    assert (key.usage, key.usage_monthly) == (Decimal(0), Decimal(0))
    assert (key.limit, key.limit_remaining) == (Decimal(5), Decimal("4.5"))
    assert (key.disabled, key.label, key.updated_at) == (False, "", None)
    with pytest.raises(ValueError):
        ProviderKey.from_json({"name": "no hash"})


def test_dumps_json_writes_decimals_as_exact_numbers() -> None:
    body = {"limit": Decimal("12.34"), "tiny": Decimal("1E-7"), "none": None, "ok": True, "n": [Decimal(0)]}
    assert dumps_json(body) == '{"limit":12.34,"tiny":0.0000001,"none":null,"ok":true,"n":[0]}'
    with pytest.raises(TypeError):
        dumps_json({"limit": 12.34})
    with pytest.raises(ValueError):
        dumps_json(Decimal("NaN"))
