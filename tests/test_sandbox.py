"""The OpenRouter sandbox over real HTTP: shapes, status codes, spend windows and fault injection."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from broker.openrouter import loads_json
from broker.sandbox import Fault, Sandbox, run_sandbox
from broker.sandbox.app import parse_listen
from broker.sandbox.state import NewKey

MANAGEMENT_KEY = "sandbox-test-management-key"
KEY_FIELDS = {
    "hash", "name", "label", "disabled", "limit", "limit_remaining", "limit_reset",
    "include_byok_in_limit", "usage", "usage_daily", "usage_weekly", "usage_monthly", "byok_usage",
    "byok_usage_daily", "byok_usage_weekly", "byok_usage_monthly", "created_at", "updated_at",
    "creator_user_id", "workspace_id",
}  # fmt: skip
HELLO = [{"role": "user", "content": "hello world!"}]  # 12 characters = 3 prompt tokens


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 1, 31, 23, 0, tzinfo=UTC))


@pytest.fixture
async def sandbox(clock: Clock) -> AsyncIterator[Sandbox]:
    sandbox = Sandbox(MANAGEMENT_KEY, clock=clock)
    await sandbox.start()
    yield sandbox
    await sandbox.stop()


@pytest.fixture
async def http(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    assert sandbox.base_url is not None
    async with httpx.AsyncClient(base_url=sandbox.base_url + "/", timeout=5) as client:
        yield client


def control(sandbox: Sandbox, path: str) -> str:
    """The absolute URL of a ``/_sandbox`` route (it lives outside ``/api/v1``)."""
    assert sandbox.base_url is not None
    return sandbox.base_url.removesuffix("/api/v1") + "/_sandbox/" + path


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ADMIN = bearer(MANAGEMENT_KEY)


def body(response: httpx.Response) -> Any:
    return loads_json(response.content)


async def create(http: httpx.AsyncClient, name: str = "user-1", **fields: Any) -> dict[str, Any]:
    response = await http.post("keys", json={"name": name, **fields}, headers=ADMIN)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = body(response)
    return created


async def chat(http: httpx.AsyncClient, secret: str, **fields: Any) -> httpx.Response:
    payload = {"model": "sandbox/test", "messages": HELLO, **fields}
    return await http.post("chat/completions", json=payload, headers=bearer(secret))


def assert_error(response: httpx.Response, status: int, message: str, error_type: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    assert error["message"] == message
    assert error["metadata"]["error_type"] == error_type


# --- keys ------------------------------------------------------------------------------------


async def test_create_returns_201_with_top_level_secret_and_full_key_object(
    http: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    created = await create(http, "user-1", limit=12.5, limit_reset="monthly")
    key = created["data"]
    assert re.fullmatch(r"sk-or-v1-[0-9a-f]{64}", created["key"])
    assert "key" not in key and set(key) >= KEY_FIELDS
    assert re.fullmatch(r"[0-9a-f]{64}", key["hash"])
    assert key["label"] == f"{created['key'][:12]}...{created['key'][-3:]}"
    assert key["limit"] == Decimal("12.5") and key["limit_remaining"] == Decimal("12.5")
    assert key["usage"] == 0 and key["usage_monthly"] == 0 and key["disabled"] is False
    assert key["created_at"] == "2026-01-31T23:00:00+00:00" and key["updated_at"] is None
    assert key["workspace_id"] == sandbox.state.workspace_id


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({}, "name is required and must be a non-empty string"),
        ({"name": ""}, "name is required and must be a non-empty string"),
        ({"name": "u", "limit": "5"}, "limit must be a number or null"),
        ({"name": "u", "limit": -1}, "limit must not be negative"),
        ({"name": "u", "limit_reset": "yearly"}, "limit_reset must be daily, weekly, monthly or null"),
        ({"name": "u", "expires_at": "2027-01-01T00:00:00+01:00"}, None),
    ],
)
async def test_create_rejects_bad_bodies_with_400(
    http: httpx.AsyncClient, payload: dict[str, Any], message: str | None
) -> None:
    response = await http.post("keys", json=payload, headers=ADMIN)
    assert response.status_code == 400
    if message is not None:
        assert_error(response, 400, message, "bad_request")


async def test_management_endpoints_authenticate_like_openrouter(http: httpx.AsyncClient) -> None:
    secret = (await create(http))["key"]
    assert_error(await http.get("keys"), 401, "No auth credentials found", "authentication")
    assert_error(await http.get("keys", headers=bearer("wrong")), 401, "User not found.", "authentication")
    assert_error(
        await http.get("keys", headers=bearer(secret)),
        403,
        "Only management keys can perform this operation",
        "permission_denied",
    )
    assert (await http.get("credits", headers=bearer(secret))).status_code == 403


async def test_list_pages_by_100_most_recent_first_and_hides_disabled_and_deleted(
    http: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    keys = [sandbox.state.create_key(NewKey(name=f"k{i}")) for i in range(230)]
    sandbox.state.get_key(keys[229].hash).disabled = True
    assert (await http.delete(f"keys/{keys[228].hash}", headers=ADMIN)).json() == {"deleted": True}

    async def page(offset: int, include_disabled: str) -> list[str]:
        params = {"offset": str(offset), "include_disabled": include_disabled}
        response = await http.get("keys", params=params, headers=ADMIN)
        assert response.status_code == 200
        return [key["name"] for key in response.json()["data"]]

    assert (await page(0, "true"))[:2] == ["k229", "k227"]
    assert (await page(0, "false"))[:2] == ["k227", "k226"]
    assert [len(await page(offset, "true")) for offset in (0, 100, 200)] == [100, 100, 29]
    assert len(await page(200, "false")) == 28
    assert (await http.get("keys", params={"offset": "-1"}, headers=ADMIN)).status_code == 400


async def test_get_patch_delete_and_404s(http: httpx.AsyncClient, clock: Clock) -> None:
    key_hash = (await create(http, limit=5))["data"]["hash"]
    clock.now += timedelta(minutes=1)
    patched = await http.patch(
        f"keys/{key_hash}", json={"disabled": True, "limit": None, "name": "renamed"}, headers=ADMIN
    )
    data = patched.json()["data"]
    summary = (data["disabled"], data["limit"], data["limit_remaining"], data["name"])
    assert summary == (True, None, None, "renamed")
    assert data["updated_at"] == "2026-01-31T23:01:00+00:00"
    assert (await http.get(f"keys/{key_hash}", headers=ADMIN)).json()["data"]["name"] == "renamed"
    bad = await http.patch(f"keys/{key_hash}", json={"disabled": "yes"}, headers=ADMIN)
    assert bad.status_code == 400
    assert (await http.delete(f"keys/{key_hash}", headers=ADMIN)).status_code == 200
    for method in ("GET", "PATCH", "DELETE"):
        response = await http.request(method, f"keys/{key_hash}", json={}, headers=ADMIN)
        assert_error(response, 404, "Key not found", "not_found")
    assert (await http.get("keys/" + "0" * 64, headers=ADMIN)).status_code == 404


async def test_unknown_route_answers_an_openrouter_error(http: httpx.AsyncClient) -> None:
    assert_error(await http.get("nowhere", headers=ADMIN), 404, "Not Found", "not_found")


# --- chat and spend ------------------------------------------------------------------------------


async def test_chat_charges_exact_cost_to_every_window(http: httpx.AsyncClient) -> None:
    created = await create(http, limit=1, limit_reset="monthly")
    response = await chat(http, created["key"], max_tokens=5)
    assert response.status_code == 200
    assert '"cost":0.000013' in response.text  # a JSON number, exactly 3 × 1e-6 + 5 × 2e-6
    reply = body(response)
    assert reply["id"].startswith("gen-") and reply["provider"] == "sandbox"
    assert reply["choices"][0]["message"]["role"] == "assistant"
    usage = reply["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (3, 5, 8)
    assert usage["cost"] == Decimal("0.000013") and usage["is_byok"] is False
    key = body(await http.get(f"keys/{created['data']['hash']}", headers=ADMIN))["data"]
    for name in ("usage", "usage_daily", "usage_weekly", "usage_monthly"):
        assert key[name] == Decimal("0.000013"), name
    assert key["limit_remaining"] == Decimal("0.999987")
    second = body(await chat(http, created["key"]))["usage"]
    assert (second["completion_tokens"], second["cost"]) == (16, Decimal("0.000035"))


async def test_chat_rejects_unknown_disabled_and_deleted_keys_and_bad_bodies(
    http: httpx.AsyncClient,
) -> None:
    disabled, deleted, good = [await create(http, f"u{i}") for i in range(3)]
    await http.patch(f"keys/{disabled['data']['hash']}", json={"disabled": True}, headers=ADMIN)
    await http.delete(f"keys/{deleted['data']['hash']}", headers=ADMIN)
    for secret in ("sk-or-v1-" + "0" * 64, disabled["key"], deleted["key"]):
        assert_error(await chat(http, secret), 401, "User not found.", "authentication")
    no_auth = await http.post("chat/completions", json={"model": "m", "messages": HELLO})
    assert_error(no_auth, 401, "No auth credentials found", "authentication")
    assert (await chat(http, MANAGEMENT_KEY)).status_code == 403
    no_model = await http.post("chat/completions", json={"messages": HELLO}, headers=bearer(good["key"]))
    assert_error(no_model, 400, "model is required", "bad_request")
    no_messages = await http.post("chat/completions", json={"model": "m"}, headers=bearer(good["key"]))
    assert no_messages.status_code == 400


async def test_key_limit_is_checked_before_charging_and_remaining_goes_negative(
    http: httpx.AsyncClient,
) -> None:
    created = await create(http, limit=0.00002, limit_reset="monthly")
    assert (await chat(http, created["key"], max_tokens=5)).status_code == 200
    assert (await chat(http, created["key"], max_tokens=5)).status_code == 200  # 0.000013 < limit
    blocked = await chat(http, created["key"], max_tokens=5)
    assert_error(
        blocked,
        403,
        "Key limit exceeded (monthly limit). Manage it using https://openrouter.ai/settings/keys",
        "permission_denied",
    )
    key = body(await http.get(f"keys/{created['data']['hash']}", headers=ADMIN))["data"]
    assert key["usage_monthly"] == Decimal("0.000026")  # the refused call was not charged
    assert key["limit_remaining"] == Decimal("-0.000006")


async def test_new_month_starts_usage_monthly_at_zero(http: httpx.AsyncClient, clock: Clock) -> None:
    created = await create(http, limit=0.00001, limit_reset="monthly")
    key_path = f"keys/{created['data']['hash']}"
    assert (await chat(http, created["key"], max_tokens=5)).status_code == 200
    assert (await chat(http, created["key"])).status_code == 403
    clock.now = datetime(2026, 2, 1, 0, 0, 1, tzinfo=UTC)
    key = body(await http.get(key_path, headers=ADMIN))["data"]
    assert (key["usage_monthly"], key["usage_daily"], key["limit_remaining"]) == (0, 0, Decimal("0.00001"))
    assert key["usage"] == Decimal("0.000013")
    assert key["usage_weekly"] == Decimal("0.000013")  # Mon 26 Jan – Sun 1 Feb is one week
    assert (await chat(http, created["key"], max_tokens=1)).status_code == 200
    key = body(await http.get(key_path, headers=ADMIN))["data"]
    assert (key["usage_monthly"], key["usage"]) == (Decimal("0.000005"), Decimal("0.000018"))


async def test_current_key_info_for_management_and_issued_keys(http: httpx.AsyncClient) -> None:
    created = await create(http, limit=2)
    await chat(http, created["key"])
    info = body(await http.get("key", headers=bearer(created["key"])))["data"]
    assert info["is_management_key"] is False and info["limit"] == 2
    assert info["usage_monthly"] == Decimal("0.000035") and info["label"].startswith("sk-or-v1-")
    admin = (await http.get("key", headers=ADMIN)).json()["data"]
    assert admin["is_management_key"] is True and admin["is_provisioning_key"] is True
    await http.delete(f"keys/{created['data']['hash']}", headers=ADMIN)
    assert_error(
        await http.get("key", headers=bearer(created["key"])), 401, "User not found.", "authentication"
    )
    credits = body(await http.get("credits", headers=ADMIN))["data"]
    assert credits["total_usage"] == Decimal("0.000035")  # deleted keys' spend still counts


# --- the control plane and faults -----------------------------------------------------------------


async def test_faults_over_http_fire_the_given_number_of_times(
    http: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    spec = {"method": "GET", "path_prefix": "/api/v1/keys", "status": 429, "retry_after": 3, "times": 2}
    assert (await http.post(control(sandbox, "faults"), json=spec)).status_code == 401
    added = await http.post(control(sandbox, "faults"), json=spec, headers=ADMIN)
    assert added.status_code == 201 and added.json()["data"]["times"] == 2
    assert (await http.post("keys", json={"name": "u"}, headers=ADMIN)).status_code == 201  # POST
    for _ in range(2):
        limited = await http.get("keys", headers=ADMIN)
        assert_error(limited, 429, "Rate limit exceeded", "rate_limit_exceeded")
        assert limited.headers["Retry-After"] == "3"
    assert (await http.get("keys", headers=ADMIN)).status_code == 200
    assert sandbox.faults.pending() == []


async def test_fault_list_clear_and_validation(http: httpx.AsyncClient, sandbox: Sandbox) -> None:
    spec = {"status": 500, "times": 5, "message": "boom"}
    assert (await http.post(control(sandbox, "faults"), json=spec, headers=ADMIN)).status_code == 201
    assert_error(await http.get("credits", headers=ADMIN), 500, "boom", "server")
    listed = (await http.get(control(sandbox, "faults"), headers=ADMIN)).json()["data"]
    assert [(f["status"], f["remaining"]) for f in listed] == [(500, 4)]
    assert (await http.delete(control(sandbox, "faults"), headers=ADMIN)).json() == {"cleared": 1}
    assert (await http.get("credits", headers=ADMIN)).status_code == 200
    bad_specs: list[dict[str, Any]] = [
        {},
        {"status": 200},
        {"status": 500, "drop_response": True},
        {"times": 0, "status": 500},
        {"status": "500"},
        {"colour": "red", "status": 500},
    ]
    for bad in bad_specs:
        assert (await http.post(control(sandbox, "faults"), json=bad, headers=ADMIN)).status_code == 400, bad


async def test_drop_response_performs_the_create_then_closes_the_connection(
    http: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    spec = {"method": "POST", "path_prefix": "/api/v1/keys", "drop_response": True}
    assert (await http.post(control(sandbox, "faults"), json=spec, headers=ADMIN)).status_code == 201
    with pytest.raises(httpx.RemoteProtocolError):
        await http.post("keys", json={"name": "lost-response"}, headers=ADMIN)
    dump = await http.get(control(sandbox, "keys"), headers=ADMIN)
    assert [key["name"] for key in dump.json()["data"]] == ["lost-response"]


async def test_delay_fault_holds_the_answer(http: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.faults.add(Fault(method="GET", path_prefix="/api/v1/credits", delay_seconds=0.3))
    started = time.monotonic()
    assert (await http.get("credits", headers=ADMIN)).status_code == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert (await http.get("credits", headers=ADMIN)).status_code == 200
    assert time.monotonic() - started < 0.3  # fired once only


async def test_key_dump_includes_deleted_keys_but_never_secrets(
    http: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    created = await create(http, "gone")
    await http.delete(f"keys/{created['data']['hash']}", headers=ADMIN)
    dump = await http.get(control(sandbox, "keys"), headers=ADMIN)
    assert [(k["name"], k["deleted"]) for k in dump.json()["data"]] == [("gone", True)]
    assert created["key"] not in dump.text
    assert created["key"] not in repr(dump.json()) and "secret" not in json.dumps(dump.json())


# --- lifecycle -------------------------------------------------------------------------------------


async def test_start_warns_loudly_and_stop_closes_the_port(caplog: pytest.LogCaptureFixture) -> None:
    sandbox = Sandbox(MANAGEMENT_KEY)
    with caplog.at_level(logging.WARNING, logger="keybroker.sandbox"):
        base_url = await sandbox.start()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api/v1", base_url)
    assert any("NOT the real OpenRouter" in r.getMessage() for r in caplog.records)
    await sandbox.stop()
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(base_url + "/key", headers=ADMIN)


async def test_run_sandbox_serves_until_cancelled() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = asyncio.Event()

    class _Started(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            started.set()

    handler = _Started(logging.WARNING)
    logging.getLogger("keybroker.sandbox").addHandler(handler)
    try:
        task = asyncio.create_task(run_sandbox(f"127.0.0.1:{port}", MANAGEMENT_KEY))
        await asyncio.wait_for(started.wait(), 5)
    finally:
        logging.getLogger("keybroker.sandbox").removeHandler(handler)
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/api/v1/key", headers=ADMIN)
        assert response.json()["data"]["is_management_key"] is True
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/api/v1/key", headers=ADMIN)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:9", ("::1", 9)), (":0", ("127.0.0.1", 0))],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["localhost", "host:port", "host:70000"])
def test_parse_listen_rejects_garbage(listen: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(listen)
