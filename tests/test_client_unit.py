"""Unit tests of the Python client library (clients/python/keybroker_client), no broker needed.

The gRPC side talks to a scripted in-process stub server over a real channel (so metadata, deadlines
and rich error trailers cross a real wire); the OpenRouter side talks to the sandbox over real HTTP.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from keybroker.v1 import keybroker_pb2 as pb
from keybroker_client import (
    AuthenticationError,
    BudgetExceededError,
    CostEstimator,
    InvalidArgumentError,
    KeyBrokerClient,
    KeybrokerClientError,
    KeyDisabledError,
    KeyExistsError,
    MonthlyLimitExceededError,
    NoApiKeyError,
    OpenRouterError,
    PermissionDeniedError,
    UnavailableError,
    from_rpc_error,
    messages,
)

from broker import errors as server_errors
from broker.sandbox import Fault, Sandbox
from broker.sandbox.state import NewKey

TOKEN = "kb-test-token-" + "s3cr3t" * 4
STATUS_DETAILS_KEY = "grpc-status-details-bin"
RPCS = [
    (service.name, method.name)
    for service in pb.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# --- a scripted gRPC server for the contract's services --------------------------------------------


@dataclass
class Abort:
    """Answer the call with this status and rich details instead of a response."""

    code: grpc.StatusCode
    message: str
    details: tuple[Message, ...] = ()


@dataclass
class Call:
    method: str
    request: Any
    metadata: dict[str, str]
    time_remaining: float | None


Reply = Message | Abort | Callable[[Any], Any]


@dataclass
class StubBroker:
    """Records every call; answers from ``replies`` (by RPC name), else the default response."""

    replies: dict[str, Reply] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)

    def calls_of(self, method: str) -> list[Any]:
        return [call.request for call in self.calls if call.method == method]

    def handlers(self) -> list[Any]:
        generic = []
        for service in pb.DESCRIPTOR.services_by_name.values():
            methods = {}
            for method in service.methods:
                request_type = getattr(pb, method.input_type.name)
                response_type = getattr(pb, method.output_type.name)
                methods[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._behaviour(method.name, response_type),
                    request_deserializer=request_type.FromString,
                    response_serializer=response_type.SerializeToString,
                )
            generic.append(grpc.method_handlers_generic_handler(service.full_name, methods))
        return generic

    def _behaviour(self, name: str, response_type: type[Message]) -> Callable[..., Any]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Message:
            metadata = {item.key: item.value for item in context.invocation_metadata()}
            self.calls.append(Call(name, request, metadata, context.time_remaining()))
            reply = self.replies.get(name, response_type())
            if callable(reply):
                reply = reply(request)
                if inspect.isawaitable(reply):
                    reply = await reply
            if isinstance(reply, Abort):
                await context.abort(reply.code, reply.message, trailing_metadata=_trailer(reply))
            return reply

        return handle


def rich_status(code: grpc.StatusCode, message: str, *details: Message) -> status_pb2.Status:
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


def _trailer(abort: Abort) -> tuple[tuple[str, bytes], ...]:
    if not abort.details:
        return ()
    status = rich_status(abort.code, abort.message, *abort.details)
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def rpc_error(code: grpc.StatusCode, message: str, *details: Message) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if details:
        trailing.add(STATUS_DETAILS_KEY, rich_status(code, message, *details).SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, message)


def error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="keybroker", metadata=metadata)


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromTimedelta(datetime.timedelta(seconds=seconds))
    return error_details_pb2.RetryInfo(retry_delay=delay)


@pytest.fixture
async def stub() -> AsyncIterator[tuple[StubBroker, str]]:
    broker = StubBroker()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(broker.handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield broker, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def client(stub: tuple[StubBroker, str]) -> AsyncIterator[KeyBrokerClient]:
    async with KeyBrokerClient(stub[1], TOKEN, timeout=3.0) as kb:
        yield kb


# --- every RPC of the contract has a client method, wired to the right path ------------------------

MINIMAL_CALLS: dict[str, dict[str, Any]] = {
    "get_key": {"user_id": "u1"},
    "check_limit": {"user_id": "u1"},
    "record_usage": {"user_id": "u1", "request_id": "gen-1", "cost_usd": Decimal("0.01")},
    "release_reservation": {"user_id": "u1", "reservation_id": "r1"},
    "rotate_key": {"user_id": "u1"},
    "provision_key": {"user_id": "u1"},
    "update_key": {"user_id": "u1"},
    "revoke_key": {"user_id": "u1"},
    "get_key_info": {"user_id": "u1"},
    "list_keys": {},
    "get_usage_summary": {"user_id": "u1"},
    "watch_keys": {"user_ids": ["u1"]},
    "report_key_invalid": {"user_id": "u1", "key_id": "k1"},
    "reconcile": {},
    "rotate_keys": {},
    "list_alerts": {},
    "get_cost_report": {"kind": "daily"},
}


def test_snake_case_of_rpc_names() -> None:
    assert snake_case("GetUsageSummary") == "get_usage_summary"
    assert {service for service, _ in RPCS} == {"KeyBroker", "KeyBrokerAdmin"}


@pytest.mark.parametrize(("service", "rpc"), RPCS, ids=[f"{s}.{m}" for s, m in RPCS])
def test_every_rpc_has_an_async_client_method(service: str, rpc: str) -> None:
    method = getattr(KeyBrokerClient, snake_case(rpc), None)
    assert inspect.iscoroutinefunction(method), f"KeyBrokerClient lacks async {snake_case(rpc)}() for {rpc}"
    assert "timeout" in inspect.signature(method).parameters


@pytest.mark.parametrize(("service", "rpc"), RPCS, ids=[f"{s}.{m}" for s, m in RPCS])
async def test_each_method_calls_its_rpc_with_token_and_deadline(
    stub: tuple[StubBroker, str], client: KeyBrokerClient, service: str, rpc: str
) -> None:
    broker, _ = stub
    descriptor = pb.DESCRIPTOR.services_by_name[service].methods_by_name[rpc]
    assert snake_case(rpc) in MINIMAL_CALLS, f"add a minimal call of {snake_case(rpc)} to MINIMAL_CALLS"
    response = await getattr(client, snake_case(rpc))(**MINIMAL_CALLS[snake_case(rpc)], timeout=2.0)
    if descriptor.server_streaming:  # a stream of the response's one message (the stub sends one)
        [response] = [item async for item in response]
        assert type(response).DESCRIPTOR is descriptor.output_type.fields[0].message_type
    else:
        assert type(response).DESCRIPTOR is descriptor.output_type
    [call] = broker.calls
    assert call.method == rpc
    assert type(call.request).DESCRIPTOR is descriptor.input_type
    assert call.metadata["authorization"] == f"Bearer {TOKEN}"
    # The wire format rounds the deadline up a little.
    assert call.time_remaining is not None and 1.0 < call.time_remaining <= 2.1


async def test_default_deadline_is_the_client_timeout(
    stub: tuple[StubBroker, str], client: KeyBrokerClient
) -> None:
    await client.get_key("u1")
    remaining = stub[0].calls[0].time_remaining
    assert remaining is not None and 2.0 < remaining <= 3.1


async def test_iter_keys_follows_page_tokens(stub: tuple[StubBroker, str], client: KeyBrokerClient) -> None:
    pages = {
        "": pb.ListKeysResponse(
            keys=[pb.KeyInfo(user_id="a"), pb.KeyInfo(user_id="b")], next_page_token="p2"
        ),
        "p2": pb.ListKeysResponse(keys=[pb.KeyInfo(user_id="c")]),
    }
    stub[0].replies["ListKeys"] = lambda request: pages[request.page_token]
    assert [key.user_id async for key in client.iter_keys(page_size=2)] == ["a", "b", "c"]
    assert [request.page_size for request in stub[0].calls_of("ListKeys")] == [2, 2]


# --- error translation --------------------------------------------------------------------------------

REASONS = [
    (grpc.StatusCode.NOT_FOUND, "NO_API_KEY", NoApiKeyError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "MONTHLY_LIMIT_EXCEEDED", MonthlyLimitExceededError),
    (grpc.StatusCode.FAILED_PRECONDITION, "KEY_DISABLED", KeyDisabledError),
    (grpc.StatusCode.ALREADY_EXISTS, "KEY_EXISTS", KeyExistsError),
    (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", InvalidArgumentError),
    (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", AuthenticationError),
    (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", PermissionDeniedError),
    (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", UnavailableError),
    (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE", UnavailableError),
    (grpc.StatusCode.ABORTED, "CONCURRENT_ROTATION", KeybrokerClientError),
    (grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_REJECTED", KeybrokerClientError),
]


@pytest.mark.parametrize(("code", "reason", "cls"), REASONS, ids=[r for _, r, _ in REASONS])
def test_reason_picks_the_exception_class(code: grpc.StatusCode, reason: str, cls: type) -> None:
    error = from_rpc_error(rpc_error(code, "it failed", error_info(reason, user_id="u1")))
    assert type(error) is cls
    assert (error.code, error.reason, error.message) == (code, reason, "it failed")
    assert error.metadata == {"user_id": "u1"}
    assert error.domain == "keybroker"


def test_monthly_limit_carries_amounts_and_quota_failure() -> None:
    quota = error_details_pb2.QuotaFailure(
        violations=[error_details_pb2.QuotaFailure.Violation(subject="user:u1", description="used up")]
    )
    info = error_info("MONTHLY_LIMIT_EXCEEDED", limit_usd="10", usage_usd="10.000000001")
    error = from_rpc_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "used up", info, quota))
    assert isinstance(error, MonthlyLimitExceededError)
    assert error.limit_usd == Decimal("10")
    assert error.usage_usd == Decimal("10.000000001")
    assert error.quota_violations == [("user:u1", "used up")]


def test_invalid_argument_carries_field_violations() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="user_id", description="too long"),
            error_details_pb2.BadRequest.FieldViolation(field="cost_usd", description="not a decimal"),
        ]
    )
    error = from_rpc_error(
        rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad", error_info("INVALID_ARGUMENT"), bad)
    )
    assert isinstance(error, InvalidArgumentError)
    assert error.field_violations == [("user_id", "too long"), ("cost_usd", "not a decimal")]


def test_unavailable_carries_retry_after() -> None:
    error = from_rpc_error(
        rpc_error(grpc.StatusCode.UNAVAILABLE, "db down", error_info("DATABASE_UNAVAILABLE"), retry_info(1.5))
    )
    assert isinstance(error, UnavailableError)
    assert error.retry_after == 1.5


BARE_CODES = [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
    (grpc.StatusCode.UNAUTHENTICATED, AuthenticationError),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
    (grpc.StatusCode.UNAVAILABLE, UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, UnavailableError),
    (grpc.StatusCode.NOT_FOUND, KeybrokerClientError),
    (grpc.StatusCode.INTERNAL, KeybrokerClientError),
]


@pytest.mark.parametrize(("code", "cls"), BARE_CODES, ids=[c.name for c, _ in BARE_CODES])
def test_status_without_details_maps_by_code(code: grpc.StatusCode, cls: type) -> None:
    error = from_rpc_error(rpc_error(code, "plain"))
    assert type(error) is cls
    assert error.reason == code.name
    assert (error.metadata, error.field_violations, error.retry_after) == ({}, [], None)


def test_unreadable_details_trailer_falls_back_to_the_code() -> None:
    trailing = grpc.aio.Metadata((STATUS_DETAILS_KEY, b"\xff\xff not a status"))
    error = from_rpc_error(grpc.aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, None, trailing, "no"))
    assert type(error) is AuthenticationError and error.reason == "UNAUTHENTICATED"


SERVER_ERRORS = [
    (server_errors.NoApiKey("u1"), NoApiKeyError),
    (server_errors.MonthlyLimitExceeded("u1", Decimal("50"), Decimal("50.5")), MonthlyLimitExceededError),
    (server_errors.KeyDisabled("u1"), KeyDisabledError),
    (server_errors.KeyExists("u1"), KeyExistsError),
    (server_errors.InvalidArgument("user_id", "must not be empty"), InvalidArgumentError),
    (server_errors.Unauthenticated("missing bearer token"), AuthenticationError),
    (server_errors.PermissionDenied("admin scope required"), PermissionDeniedError),
    (server_errors.DatabaseUnavailable("database unreachable", retry_after_seconds=2.0), UnavailableError),
    (server_errors.ProviderUnavailable("OpenRouter unreachable", 503), UnavailableError),
]


@pytest.mark.parametrize(
    ("domain_error", "cls"), SERVER_ERRORS, ids=[type(e).__name__ for e, _ in SERVER_ERRORS]
)
def test_client_reads_what_the_server_error_table_writes(
    domain_error: server_errors.KeybrokerError, cls: type
) -> None:
    sent = server_errors.to_rpc_status(domain_error)
    trailing = grpc.aio.Metadata((STATUS_DETAILS_KEY, sent.details.SerializeToString()))
    error = from_rpc_error(grpc.aio.AioRpcError(sent.code, None, trailing, sent.message))
    assert type(error) is cls
    assert (error.code, error.reason, error.metadata) == (
        sent.code,
        domain_error.reason,
        domain_error.metadata,
    )
    if isinstance(domain_error, server_errors.InvalidArgument):
        assert error.field_violations == [("user_id", "must not be empty")]
    if isinstance(domain_error, server_errors.MonthlyLimitExceeded):
        assert isinstance(error, MonthlyLimitExceededError)
        assert (error.limit_usd, error.usage_usd) == (Decimal("50"), Decimal("50.5"))
    if isinstance(domain_error, server_errors.Unavailable):
        assert error.retry_after == domain_error.retry_after_seconds


async def test_rich_error_over_the_wire_is_typed_and_never_shows_the_token(
    stub: tuple[StubBroker, str], client: KeyBrokerClient
) -> None:
    info = error_info("NO_API_KEY", user_id="u1")
    stub[0].replies["GetKey"] = Abort(grpc.StatusCode.NOT_FOUND, f"no key (echo {TOKEN})", (info,))
    with pytest.raises(NoApiKeyError) as caught:
        await client.get_key("u1")
    error = caught.value
    assert error.metadata == {"user_id": "u1"}
    assert TOKEN not in str(error) and TOKEN not in repr(error) and TOKEN not in error.message
    assert error.__cause__ is None  # the raw gRPC error repeated the token, so it is not chained


async def test_deadline_exceeded_is_unavailable(
    stub: tuple[StubBroker, str], client: KeyBrokerClient
) -> None:
    async def slow(request: Any) -> Message:
        await asyncio.sleep(2)
        return pb.GetKeyResponse()

    stub[0].replies["GetKey"] = slow
    with pytest.raises(UnavailableError) as caught:
        await client.get_key("u1", timeout=0.2)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_unreachable_broker_is_unavailable() -> None:
    async with KeyBrokerClient("127.0.0.1:1", TOKEN) as unreachable:
        with pytest.raises(UnavailableError) as caught:
            await unreachable.get_key("u1", timeout=2.0)
    assert TOKEN not in str(caught.value)


# --- request building: money never goes through float ---------------------------------------------


def test_money_sums_stay_exact_in_the_request() -> None:
    three_dimes = Decimal("0.1") + Decimal("0.1") + Decimal("0.1")
    assert 0.1 + 0.1 + 0.1 != 0.3  # what a float would have done
    check = messages.check_limit_request("u1", estimated_cost_usd=three_dimes)
    record = messages.record_usage_request("u1", request_id="gen-1", cost_usd=three_dimes)
    assert check.estimated_cost_usd == "0.3"
    assert record.cost_usd == "0.3"


@pytest.mark.parametrize(
    ("amount", "wire"),
    [
        (Decimal("0.000123"), "0.000123"),
        (Decimal("1E+1"), "10"),
        (Decimal("1.5E-7"), "0.00000015"),
        (Decimal("12.50"), "12.50"),
        ("1e-5", "0.00001"),
        ("12.5", "12.5"),
        (7, "7"),
        (Decimal("999999999999.9999999999"), "999999999999.9999999999"),
    ],
)
def test_usd_is_a_plain_decimal_string(amount: messages.Money, wire: str) -> None:
    assert messages.usd(amount) == wire


def test_usd_refuses_floats_and_non_numbers() -> None:
    with pytest.raises(TypeError):
        messages.usd(0.1)  # type: ignore[arg-type]
    for bad in ("abc", "NaN", Decimal("Infinity")):
        with pytest.raises(ValueError):
            messages.usd(bad)


def test_optional_fields_stay_unset_unless_given() -> None:
    untouched = messages.update_key_request("u1")
    assert not any(untouched.HasField(name) for name in ("tier", "monthly_limit_usd", "disabled"))
    cleared = messages.update_key_request("u1", monthly_limit_usd="", disabled=False, tier="beta")
    assert cleared.HasField("monthly_limit_usd") and cleared.monthly_limit_usd == ""
    assert cleared.HasField("disabled") and cleared.disabled is False
    assert messages.update_key_request("u1", monthly_limit_usd=Decimal("25.00")).monthly_limit_usd == "25.00"
    assert messages.check_limit_request("u1").estimated_cost_usd == ""
    assert not messages.rotate_key_request("u1").HasField("grace_period")


def test_durations_months_and_request_ids() -> None:
    rotate = messages.rotate_key_request("u1", grace_period=datetime.timedelta(minutes=5, milliseconds=250))
    assert (rotate.grace_period.seconds, rotate.grace_period.nanos) == (300, 250_000_000)
    assert rotate.request_id  # generated when not given
    assert messages.rotate_key_request("u1", request_id="rot-1").request_id == "rot-1"
    usage = messages.record_usage_request(
        "u1", request_id="gen-1", cost_usd="0", duration_=datetime.timedelta(seconds=1.5)
    )
    assert (usage.duration.seconds, usage.duration.nanos) == (1, 500_000_000)
    assert messages.get_usage_summary_request("u1", month=datetime.date(2025, 3, 31)).month == "2025-03"
    assert messages.get_usage_summary_request("u1").month == ""


# --- cost estimate -----------------------------------------------------------------------------------


def test_estimate_is_exact_decimal_arithmetic() -> None:
    payload = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "x" * 10}]}
    # ceil(10 / 4) = 3 prompt tokens × 0.00001 + 100 × 0.00002
    assert CostEstimator().estimate(payload) == Decimal("0.00203")
    assert str(CostEstimator().estimate(payload)) == "0.00203"


def test_estimate_defaults_to_1024_completion_tokens_and_counts_text_parts() -> None:
    parts = [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "data:..."}}]
    payload = {"messages": [{"role": "system", "content": "12345"}, {"role": "user", "content": parts}]}
    # 9 characters → 3 tokens; 1024 completion tokens by default
    assert CostEstimator().estimate(payload) == 3 * Decimal("0.00001") + 1024 * Decimal("0.00002")


def test_estimate_with_tiny_prices_does_not_round() -> None:
    tiny = CostEstimator(
        max_completion_price_per_token=Decimal("0.0000000000000000000000000001"),
        max_prompt_price_per_token=Decimal("3"),
    )
    estimate = tiny.estimate({"max_tokens": 7, "messages": [{"content": "abcde"}]})
    assert estimate == Decimal("6.0000000000000000000000000007")


# --- key cache ---------------------------------------------------------------------------------------


async def test_key_cache_follows_versions_and_invalidation(
    stub: tuple[StubBroker, str], client: KeyBrokerClient
) -> None:
    broker, _ = stub
    broker.replies["GetKey"] = pb.GetKeyResponse(api_key="sk-or-v1-one", key_version=1)
    assert (await client.get_key_cached("u1")).api_key == "sk-or-v1-one"
    assert (await client.get_key_cached("u1", current_version=1)).api_key == "sk-or-v1-one"
    assert len(broker.calls_of("GetKey")) == 1

    broker.replies["GetKey"] = pb.GetKeyResponse(api_key="sk-or-v1-two", key_version=2)
    assert (await client.get_key_cached("u1", current_version=2)).api_key == "sk-or-v1-two"
    assert len(broker.calls_of("GetKey")) == 2

    client.invalidate_key("u1")
    await client.get_key_cached("u1")
    assert len(broker.calls_of("GetKey")) == 3


async def test_concurrent_cache_misses_share_one_get_key(
    stub: tuple[StubBroker, str], client: KeyBrokerClient
) -> None:
    async def slow_key(request: Any) -> Message:
        await asyncio.sleep(0.05)
        return pb.GetKeyResponse(api_key="sk-or-v1-x", key_version=1)

    stub[0].replies["GetKey"] = slow_key
    keys = await asyncio.gather(*(client.get_key_cached("u1", current_version=1) for _ in range(50)))
    assert {key.api_key for key in keys} == {"sk-or-v1-x"}
    assert len(stub[0].calls_of("GetKey")) == 1


# --- openrouter_chat: stub broker over gRPC, the sandbox over real HTTP ------------------------------

CHAT = {"model": "openai/gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def user_key(sandbox: Sandbox, stub: tuple[StubBroker, str]) -> str:
    """A real sandbox key, which the stub broker hands out as the user's version-1 key."""
    secret = sandbox.state.create_key(NewKey(name="u1")).secret
    stub[0].replies["GetKey"] = pb.GetKeyResponse(api_key=secret, key_version=1)
    stub[0].replies["CheckLimit"] = pb.CheckLimitResponse(allowed=True, reservation_id="res-1", key_version=1)
    return secret


async def test_chat_reserves_calls_and_records_exact_usage(
    sandbox: Sandbox, stub: tuple[StubBroker, str], client: KeyBrokerClient, user_key: str
) -> None:
    reply = await client.openrouter_chat("u1", CHAT, agent="planner", openrouter_base_url=sandbox.base_url)
    broker, _ = stub
    [check] = broker.calls_of("CheckLimit")
    assert Decimal(check.estimated_cost_usd) == CostEstimator().estimate(CHAT)
    assert check.request_id
    [record] = broker.calls_of("RecordUsage")
    usage = reply["usage"]
    assert isinstance(usage["cost"], Decimal)
    assert (record.request_id, record.reservation_id, record.model, record.agent) == (
        reply["id"],
        "res-1",
        "openai/gpt-4o-mini",
        "planner",
    )
    assert Decimal(record.cost_usd) == usage["cost"]
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["total_tokens"],
    )
    assert record.duration.ToTimedelta() > datetime.timedelta(0)
    assert broker.calls_of("ReleaseReservation") == []


async def test_chat_refused_budget_raises_before_calling_openrouter(
    sandbox: Sandbox, stub: tuple[StubBroker, str], client: KeyBrokerClient, user_key: str
) -> None:
    stub[0].replies["CheckLimit"] = pb.CheckLimitResponse(allowed=False, limit_usd="10", spent_usd="9.99")
    with pytest.raises(BudgetExceededError) as caught:
        await client.openrouter_chat("u1", CHAT, openrouter_base_url=sandbox.base_url)
    assert isinstance(caught.value, MonthlyLimitExceededError)
    assert caught.value.reason == "MONTHLY_LIMIT_EXCEEDED"
    assert caught.value.limit_usd == Decimal("10")
    assert stub[0].calls_of("GetKey") == []
    assert sandbox.state.total_usage() == 0


async def test_chat_401_releases_and_forgets_the_key(
    sandbox: Sandbox, stub: tuple[StubBroker, str], client: KeyBrokerClient, user_key: str
) -> None:
    stub[0].replies["GetKey"] = pb.GetKeyResponse(api_key="sk-or-v1-" + secrets.token_hex(8), key_version=1)
    with pytest.raises(OpenRouterError) as caught:
        await client.openrouter_chat("u1", CHAT, openrouter_base_url=sandbox.base_url)
    assert caught.value.status == 401
    assert "sk-or-v1" not in str(caught.value) and caught.value.__cause__ is None
    assert [r.reservation_id for r in stub[0].calls_of("ReleaseReservation")] == ["res-1"]
    await client.get_key_cached("u1", current_version=1)
    assert len(stub[0].calls_of("GetKey")) == 2  # the rejected key was not kept


async def test_chat_server_error_releases_the_reservation(
    sandbox: Sandbox, stub: tuple[StubBroker, str], client: KeyBrokerClient, user_key: str
) -> None:
    sandbox.faults.add(Fault(path_prefix="/api/v1/chat", status=502, message="upstream fell over"))
    with pytest.raises(OpenRouterError) as caught:
        await client.openrouter_chat("u1", CHAT, openrouter_base_url=sandbox.base_url)
    assert (caught.value.status, caught.value.message) == (502, "upstream fell over")
    assert user_key not in str(caught.value)
    assert len(stub[0].calls_of("ReleaseReservation")) == 1
    assert stub[0].calls_of("RecordUsage") == []


async def test_chat_retries_record_usage_with_the_same_request_id(
    sandbox: Sandbox, stub: tuple[StubBroker, str], client: KeyBrokerClient, user_key: str
) -> None:
    failures = iter([True, True, False])

    def flaky(request: Any) -> Message | Abort:
        if next(failures):
            info = error_info("DATABASE_UNAVAILABLE")
            return Abort(grpc.StatusCode.UNAVAILABLE, "database unreachable", (info, retry_info(0.01)))
        return pb.RecordUsageResponse(spent_usd="0.01")

    stub[0].replies["RecordUsage"] = flaky
    reply = await client.openrouter_chat("u1", CHAT, openrouter_base_url=sandbox.base_url)
    assert [r.request_id for r in stub[0].calls_of("RecordUsage")] == [reply["id"]] * 3


async def test_chat_gives_up_after_three_record_usage_retries(
    sandbox: Sandbox, stub: tuple[StubBroker, str], client: KeyBrokerClient, user_key: str
) -> None:
    info = error_info("DATABASE_UNAVAILABLE")
    stub[0].replies["RecordUsage"] = Abort(grpc.StatusCode.UNAVAILABLE, "down", (info, retry_info(0)))
    with pytest.raises(UnavailableError):
        await client.openrouter_chat("u1", CHAT, openrouter_base_url=sandbox.base_url)
    assert len(stub[0].calls_of("RecordUsage")) == 4
