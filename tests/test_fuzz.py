"""Fuzzing every RPC (issue 5, item 5): hypothesis builds requests for every method of KeyBroker and
KeyBrokerAdmin from the proto descriptors — hostile strings (unicode, control characters, NUL, very
long), huge and negative integers, money with exponents, NaN, Infinity, "-0" and too many digits,
negative and huge durations, missing fields — and sends them to one real broker.

Every answer must be a documented code (never INTERNAL, UNKNOWN or UNIMPLEMENTED), every error must
carry an ErrorInfo of domain "keybroker", and every INVALID_ARGUMENT must have written nothing.
"""

from __future__ import annotations

import base64
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor, duration_pb2
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from broker.sandbox import Sandbox
from tests.conftest import Broker
from tests.helpers import (
    bad_request_fields,
    error_info,
    fresh_database,
    running_broker,
    stream_outcome,
    table_counts,
    written_tables,
)

SERVICES = (pb.DESCRIPTOR.services_by_name["KeyBroker"], pb.DESCRIPTOR.services_by_name["KeyBrokerAdmin"])
METHODS = {method.name: method for service in SERVICES for method in service.methods}
UNARY = sorted(name for name, m in METHODS.items() if not (m.server_streaming or m.client_streaming))
STREAMING = sorted(name for name, m in METHODS.items() if m.server_streaming or m.client_streaming)

DOCUMENTED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNAVAILABLE,
    }
)
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9_]*$")
# Users with keys, for requests that get past "no such user": (user_id, tier, custom limit).
KNOWN = (
    ("fuzz-free", "free", ""),
    ("fuzz-beta", "beta", ""),
    ("fuzz-unlimited", "admin", ""),
    ("fuzz-custom", "standard", "0.5"),
)
KNOWN_USERS = tuple(user for user, _, _ in KNOWN)
TIERS = ("free", "standard", "micro", "operator", "enterprise", "beta", "admin", "future4200")
INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
# A message must stay under the server's 1 MiB receive limit, so "very long" is tens of kilobytes.
LONG_LENGTHS = (129, 201, 1_000, 4_096, 20_000)

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# --- strategies ----------------------------------------------------------------------------------
#
# Each field has a strategy for contract-conforming values and one for hostile ones. A request is
# mostly a valid one with one or two fields broken (so that validation of the later fields and the
# code behind it are reached too), sometimes entirely random.


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of `choices`, each drawn in proportion to its weight (shrinks towards the first)."""
    index = [i for i, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(index).flatmap(lambda i: choices[i][1])


# Text without lone surrogates (protobuf strings are UTF-8) but with every other kind of character.
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)
long_text = st.builds(
    lambda unit, n: (unit * n)[:n],
    st.sampled_from(["a", "\x00", "é", "😀", "-", "9", " "]),
    st.sampled_from(LONG_LENGTHS),
)
HOSTILE_TEXT = (
    "", " ", "  x  ", "\t", "\n", "\r\n", "\x00", "x\x00", "\x00x", "\x1b[31mred", "\x7f", "\x85",
    "\u2028", "\u200b", "\ufeff", "\u202e", "é", "ß", "İ", "Ω", "😀",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467", "漢字", "ｆｕｌｌ", "١٢٣", "²", "Ⅻ",
    "\U0010ffff", "\ue000", "'; DROP TABLE users; --", "%s%n%x", "{0}", "${jndi:ldap://x}",
    "../../etc/passwd", "<script>", "NULL", "null", "None", "true", "NaN", "Infinity", "-0", "1e3",
)  # fmt: skip
hostile_text = st.one_of(st.sampled_from(HOSTILE_TEXT), any_text, long_text)


def glued(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid value with something bad glued on: what a lenient `^...$` regex lets through."""
    affixes = st.sampled_from(["\n", "\r", "\x00", " ", "\t", "é", "\u200b", "/", "%", "*", "'"])
    return st.one_of(
        st.builds(lambda v, a: v + a, valid, affixes),
        st.builds(lambda v, a: a + v, valid, affixes),
    )


def broken(valid: st.SearchStrategy[str], *specific: str) -> st.SearchStrategy[str]:
    return st.one_of(glued(valid), hostile_text, *([st.sampled_from(specific)] if specific else []))


@dataclass(frozen=True)
class Field:
    valid: st.SearchStrategy[Any]
    hostile: st.SearchStrategy[Any]


valid_user_ids = weighted(
    (4, st.sampled_from(KNOWN_USERS)),
    (2, st.from_regex(r"[A-Za-z0-9._:@-]{1,40}", fullmatch=True)),
    (1, st.just("u" * 128)),
)
USER_ID = Field(valid_user_ids, broken(valid_user_ids, "u" * 129))
valid_request_ids = st.one_of(
    st.uuids().map(lambda u: f"gen-{u}"),
    st.sampled_from(["r1", "r2", "gen-1"]),  # repeats: idempotent replays
    st.from_regex(r"[\x21-\x7e]{1,200}", fullmatch=True),
    st.just("~" * 200),
)
REQUEST_ID = Field(valid_request_ids, broken(valid_request_ids, "r" * 201, "a b", "é"))

HOSTILE_MONEY = (
    "NaN", "nan", "sNaN", "-NaN", "Infinity", "-Infinity", "inf", "+inf", "-0", "-0.0", "+1", "-1",
    "-0.01", "1e3", "1E3", "1e-3", "1.5e+2", "1e999999999", "0x10", "1_000", "1,5", "1.2.3", ".5", "5.",
    ".", " 1", "1 ", "1\n", "\n1", "\x001", "1\x00", "１", "١", "²", "0.00000000001",
    "0." + "0" * 30 + "1", "1" * 13, "9" * 12 + "." + "9" * 11, "1" * 100, "0" * 13, "00000000000000.1",
    "999999999999.99999999999", "1" * 40_000,
)  # fmt: skip
VALID_MONEY = (
    "0", "0.0", "0.01", "1", "10.5", "0.0000000001", "0000.5", "999999999999.9999999999", "123456789012",
)  # fmt: skip
valid_money = st.one_of(
    st.sampled_from(VALID_MONEY), st.from_regex(r"[0-9]{1,12}(\.[0-9]{1,10})?", fullmatch=True)
)
MONEY = Field(
    valid_money,
    st.one_of(
        st.sampled_from(HOSTILE_MONEY),
        st.decimals(allow_nan=True, allow_infinity=True).map(str),  # "1E+3", "-0", "sNaN", ...
        st.floats().map(str),
        st.builds(lambda d, e: f"{d}e{e}", valid_money, st.integers(-400, 400)),
        glued(valid_money),
        hostile_text,
    ),
)
valid_uuids = st.uuids().map(str)
RESERVATION_ID = Field(
    valid_uuids,
    st.one_of(
        st.uuids().flatmap(
            lambda u: st.sampled_from([u.hex, str(u).upper(), "{" + str(u) + "}", u.urn, str(u)[:-1]])
        ),
        broken(valid_uuids),
    ),
)
valid_months = st.builds(lambda y, m: f"{y:04d}-{m:02d}", st.integers(2000, 2999), st.integers(1, 12))
MONTH = Field(
    st.one_of(valid_months, st.just("")),
    st.one_of(
        st.sampled_from(
            [
                "1999-12",
                "3000-01",
                "2026-00",
                "2026-13",
                "2026-1",
                "26-01",
                "2026/01",
                "２０２６-０１",
                "2026-01-01",
            ]
        ),
        st.builds(lambda y, m: f"{y}-{m}", st.integers(*INT64), st.integers(*INT64)),
        broken(valid_months),
    ),
)
valid_dates = st.dates(date(2000, 1, 1), date(2999, 12, 31)).map(date.isoformat)
DATE = Field(
    st.one_of(valid_dates, st.just("")),
    st.one_of(
        st.sampled_from(
            [
                "2026-02-30",
                "2026-13-01",
                "2026-1-1",
                "26-01-01",
                "２０２６-０１-０１",
                "2026-01",
                "1999-12-31",
            ]
        ),
        broken(valid_dates),
    ),
)
valid_tiers = st.sampled_from(TIERS)
TIER = Field(valid_tiers, broken(valid_tiers, "nonexistent", "FREE", "x" * 33))


def page_token_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


PAGE_TOKEN = Field(
    st.one_of(st.just(""), valid_user_ids.map(page_token_of)),
    st.one_of(
        any_text.map(page_token_of),  # decodes to text with NUL, controls, anything
        st.binary(max_size=64).map(lambda b: base64.urlsafe_b64encode(b).decode()),
        hostile_text,
    ),
)
valid_key_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)
KEY_ID = Field(valid_key_ids, broken(valid_key_ids, "k" * 129))
valid_free_text = st.from_regex(r"[ -~]{0,200}", fullmatch=True)
FREE_TEXT = Field(valid_free_text, broken(valid_free_text, "m" * 201))

int64s = st.one_of(
    st.sampled_from([-1, 10**12 + 1, 2**31, 2**32, 2**53 + 1, 2**62, INT64[0], INT64[1], INT64[0] + 1]),
    st.integers(*INT64),
)
int32s = st.one_of(st.sampled_from([-1, 1001, 100_000, INT32[0], INT32[1]]), st.integers(*INT32))
TOKENS = Field(st.one_of(st.integers(0, 10**12), st.sampled_from([0, 10**12])), int64s)
PAGE_SIZE = Field(st.integers(0, 1000), int32s)
HTTP_STATUS = Field(st.sampled_from([401, 403, 200, 100, 599]), int32s)
DRY_RUN = Field(weighted((4, st.just(True)), (1, st.just(False))), st.booleans())

DURATION_LIMIT = 315_576_000_000  # the protobuf Duration range, in seconds
OUT_OF_RANGE_DURATIONS = (
    (-1, 0), (0, -1), (-1, 999_999_999), (-DURATION_LIMIT - 1, 0), (INT64[0], -999_999_999),
    (DURATION_LIMIT, 0), (DURATION_LIMIT + 1, 0), (10**14, 0), (INT64[1], 999_999_999),
)  # fmt: skip


def durations_up_to(seconds: int) -> Field:
    to_message = lambda sn: duration_pb2.Duration(seconds=sn[0], nanos=sn[1])  # noqa: E731
    valid = st.tuples(st.integers(0, seconds - 1), st.integers(0, 999_999_999))
    hostile = st.one_of(
        st.sampled_from([*OUT_OF_RANGE_DURATIONS, (seconds, 1), (0, 10**9), (1, -999_999_999)]),
        st.tuples(st.integers(*INT64), st.integers(*INT32)),
    )
    return Field(valid.map(to_message), hostile.map(to_message))


DAY = 86_400
FIELDS_BY_NAME: dict[str, Field] = {
    "user_id": USER_ID,
    "user_ids": USER_ID,
    "request_id": REQUEST_ID,
    "reservation_id": RESERVATION_ID,
    "month": MONTH,
    "date": DATE,
    "tier": TIER,
    "page_token": PAGE_TOKEN,
    "key_id": KEY_ID,
    "page_size": PAGE_SIZE,
    "http_status": HTTP_STATUS,
    "dry_run": DRY_RUN,
    "duration": durations_up_to(DAY),
    "grace_period": durations_up_to(30 * DAY),
    "older_than": durations_up_to(3650 * DAY),
}
FD = descriptor.FieldDescriptor


def field_of(field: descriptor.FieldDescriptor) -> Field:
    """Valid and hostile values of one (non-repeated) field, by its name, else by its type."""
    if field.name in FIELDS_BY_NAME:
        return FIELDS_BY_NAME[field.name]
    if field.message_type is not None:
        if field.message_type.full_name == "google.protobuf.Duration":
            return durations_up_to(DAY)
        return Field(message_strategy(field.message_type), message_strategy(field.message_type))
    if field.type == FD.TYPE_STRING:
        return MONEY if field.name.endswith("_usd") else FREE_TEXT
    if field.type == FD.TYPE_BOOL:
        return Field(st.booleans(), st.booleans())
    if field.type in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return TOKENS if field.name.endswith("tokens") else Field(st.integers(0, 1000), int64s)
    if field.type in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return Field(st.integers(0, 1000), int32s)
    if field.type in (FD.TYPE_UINT64, FD.TYPE_FIXED64, FD.TYPE_UINT32, FD.TYPE_FIXED32):
        bits = 64 if field.type in (FD.TYPE_UINT64, FD.TYPE_FIXED64) else 32
        return Field(st.integers(0, 1000), st.integers(0, 2**bits - 1))
    if field.type == FD.TYPE_ENUM:  # proto3 enums are open: unknown numbers arrive too
        assert field.enum_type is not None
        return Field(st.sampled_from([v.number for v in field.enum_type.values]), int32s)
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return Field(st.floats(0, 1000), st.floats())
    if field.type == FD.TYPE_BYTES:
        return Field(st.binary(max_size=64), st.binary(max_size=4096))
    raise AssertionError(f"no strategy for field {field.full_name}")


def field_values(field: descriptor.FieldDescriptor, break_it: bool) -> st.SearchStrategy[Any]:
    """A value for `field` (None = left out): valid, or broken (hostile, or missing)."""
    one = field_of(field)
    if field.is_repeated:
        if not break_it:
            return st.lists(one.valid, max_size=5)
        oversized = st.lists(valid_user_ids, min_size=1001, max_size=1001)
        return st.one_of(
            st.lists(st.one_of(one.valid, one.hostile), min_size=1, max_size=5),
            oversized if field.name == "user_ids" else st.nothing(),
        )
    if break_it:
        return weighted((4, one.hostile), (1, st.none()))
    return one.valid


def message_class(message: descriptor.Descriptor) -> type[Any]:
    if message.full_name == "google.protobuf.Duration":
        return duration_pb2.Duration
    cls: type[Any] = getattr(pb, message.name)
    return cls


def build_message(message: descriptor.Descriptor, values: dict[str, Any]) -> Any:
    request = message_class(message)()
    for name, value in values.items():
        field = message.fields_by_name[name]
        if value is None:
            continue
        if field.is_repeated:
            container = getattr(request, name)
            if field.message_type is not None:
                for item in value:
                    container.add().CopyFrom(item)
            else:
                container.extend(value)
        elif field.message_type is not None:
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def message_strategy(message: descriptor.Descriptor) -> st.SearchStrategy[Any]:
    """Mostly a valid request with 0-2 broken fields; sometimes every field a coin toss."""
    names = [field.name for field in message.fields]

    assert names, f"{message.full_name} has no fields to fuzz"

    @st.composite
    def requests(draw: st.DrawFn) -> Any:
        chaotic = draw(weighted((4, st.just(False)), (1, st.just(True))), label="chaotic")
        to_break = draw(st.sets(st.sampled_from(names), max_size=None if chaotic else 2), label="broken")
        values = {
            field.name: draw(field_values(field, field.name in to_break), label=field.name)
            for field in message.fields
        }
        return build_message(message, values)

    return requests()


# --- the broker under fuzz ---------------------------------------------------------------------------


@dataclass
class Fuzzed:
    """One broker for the whole module, and a connection that counts rows in its database."""

    broker: Broker
    conn: asyncpg.Connection
    tables: tuple[str, ...]

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How hypothesis shows this argument of a failing example: never the settings' secrets."""
        printer.text(f"Fuzzed(target={self.broker.target!r})")

    def unary(self, name: str) -> Callable[..., Any]:
        method = METHODS[name]
        call: Callable[..., Any] = self.broker.channel.unary_unary(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=message_class(method.input_type).SerializeToString,
            response_deserializer=message_class(method.output_type).FromString,
        )
        return call

    async def exercise(self, name: str, request: Any) -> grpc.StatusCode:
        """Send `request`; check the answer; on INVALID_ARGUMENT check that nothing was written."""
        before = await table_counts(self.conn, self.tables)
        try:
            await self.unary(name)(request, metadata=self.broker.as_admin(), timeout=60)
        except grpc.aio.AioRpcError as error:
            check_error(error, METHODS[name], request)
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                after = await table_counts(self.conn, self.tables)
                assert after == before, (
                    f"{name} was refused as INVALID_ARGUMENT but wrote rows: {before} -> {after}"
                )
            code = error.code()
        else:
            code = grpc.StatusCode.OK
        if currently_in_test_context():
            event(f"{name}: {code.name}")  # the spread shows with --hypothesis-show-statistics
        return code


def check_error(error: grpc.aio.AioRpcError, method: descriptor.MethodDescriptor, request: Any) -> None:
    shown = f"{method.name} answered {error.code().name} ({error.details()!r}) to {short(request)}"
    assert error.code() in DOCUMENTED, shown
    info = error_info(error)
    assert info.domain == "keybroker", shown
    assert UPPER_SNAKE.match(info.reason), (info.reason, shown)
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        fields = bad_request_fields(error)
        assert fields, f"INVALID_ARGUMENT without a BadRequest field violation: {shown}"
        known = set(method.input_type.fields_by_name)
        for field in fields:
            assert re.split(r"[.\[]", field)[0] in known, f"BadRequest names unknown field {field!r}: {shown}"


def short(request: Any) -> str:
    text = repr(str(request))
    return text if len(text) < 600 else text[:600] + "...'"


@pytest.fixture(scope="module")
async def fuzzed(
    pg_admin_url: str, template_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fuzzed]:
    """A broker of its own for the module; background work is slowed right down so that nothing but
    the fuzzed call writes between the two row counts."""
    sandbox = Sandbox("sandbox-management-" + secrets.token_hex(8))
    await sandbox.start("127.0.0.1", 0)
    try:
        async with (
            fresh_database(pg_admin_url) as url,
            running_broker(
                url, sandbox, tmp_path_factory.mktemp("fuzz"), background_interval=timedelta(hours=1)
            ) as broker,
        ):
            conn = await broker.db()
            try:
                yield Fuzzed(broker, conn, await written_tables(conn))
            finally:
                await conn.close()
    finally:
        await sandbox.stop()


@pytest.fixture
async def fuzzed_users(fuzzed: Fuzzed) -> Fuzzed:
    """Before each test (not each example): the known users have active keys again, whatever the
    fuzzing of RevokeKey or UpdateKey did to them."""
    admin, metadata = fuzzed.broker.admin, fuzzed.broker.as_admin()
    for user, tier, limit in KNOWN:
        try:
            info = (await admin.GetKeyInfo(pb.GetKeyInfoRequest(user_id=user), metadata=metadata)).key
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
            info = None
        if info is None or info.status == pb.KEY_STATUS_REVOKED:
            request = pb.ProvisionKeyRequest(
                user_id=user, tier=tier, monthly_limit_usd=limit, request_id=f"restore-{uuid.uuid4()}"
            )
            await admin.ProvisionKey(request, metadata=metadata, timeout=30)
        elif info.status == pb.KEY_STATUS_DISABLED:
            await admin.UpdateKey(pb.UpdateKeyRequest(user_id=user, disabled=False), metadata=metadata)
    return fuzzed


# --- the fuzz tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", UNARY)
@FUZZ
@given(data=st.data())
async def test_fuzzed_requests_get_documented_answers_and_rejections_write_nothing(
    fuzzed_users: Fuzzed, rpc: str, data: st.DataObject
) -> None:
    request = data.draw(message_strategy(METHODS[rpc].input_type), label="request")
    await fuzzed_users.exercise(rpc, request)


@settings(FUZZ, max_examples=6)
@given(request=message_strategy(METHODS["WatchKeys"].input_type))
async def test_a_fuzzed_watch_filter_opens_a_stream_or_is_refused_cleanly(
    fuzzed: Fuzzed, request: pb.WatchKeysRequest
) -> None:
    before = await table_counts(fuzzed.conn, fuzzed.tables)
    call = pb_grpc.KeyBrokerStub(fuzzed.broker.channel).WatchKeys(
        request, metadata=fuzzed.broker.as_admin(), timeout=60
    )
    error = await stream_outcome(call, quiet_seconds=0.25)  # cancels the stream
    if error is not None:
        check_error(error, METHODS["WatchKeys"], request)
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert await table_counts(fuzzed.conn, fuzzed.tables) == before


def test_every_rpc_of_the_contract_is_fuzzed() -> None:
    """A new RPC in the proto is fuzzed without anyone editing this file."""
    covered = set(UNARY) | set(STREAMING)
    assert covered == {m.name for s in SERVICES for m in s.methods}
    assert STREAMING == ["WatchKeys"], "a new streaming RPC needs its own fuzz test"


# --- targeted cases that random search reaches too rarely -----------------------------------------


async def test_a_value_with_a_trailing_newline_is_not_a_valid_user_id(fuzzed: Fuzzed) -> None:
    """`^...$` in Python also matches before a final newline; the contract's character set has none."""
    for user in ("fuzz-new\n", "fuzz-free\n"):
        code = await fuzzed.exercise(
            "ProvisionKey", pb.ProvisionKeyRequest(user_id=user, request_id=f"nl-{uuid.uuid4()}")
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (user, code)
        for rpc, request in (
            ("GetKey", pb.GetKeyRequest(user_id=user)),
            ("CheckLimit", pb.CheckLimitRequest(user_id=user, estimated_cost_usd="0.1")),
            ("GetUsageSummary", pb.GetUsageSummaryRequest(user_id=user)),
        ):
            assert await fuzzed.exercise(rpc, request) == grpc.StatusCode.INVALID_ARGUMENT, (rpc, user)


async def test_spend_past_fourteen_digits_is_never_internal_and_counts_exactly_what_was_acknowledged(
    fuzzed: Fuzzed,
) -> None:
    """Each amount may have 12 integer digits: 101 of the largest would overflow a NUMERIC(24,10)
    counter. Whether the broker records or refuses the 101st, it answers a documented code and its
    totals match its answers."""
    user = f"fuzz-whale-{uuid.uuid4().hex[:8]}"
    await fuzzed.broker.provision(user, tier="admin")
    largest = "999999999999.9999999999"
    codes = [
        await fuzzed.exercise(
            "RecordUsage", pb.RecordUsageRequest(user_id=user, request_id=f"big-{i}", cost_usd=largest)
        )
        for i in range(101)
    ]
    assert codes[:100] == [grpc.StatusCode.OK] * 100
    acknowledged = codes.count(grpc.StatusCode.OK)
    summary = await fuzzed.broker.admin.GetUsageSummary(
        pb.GetUsageSummaryRequest(user_id=user), metadata=fuzzed.broker.as_admin()
    )
    assert summary.total_requests == acknowledged, "what was acknowledged is all counted, nothing else"
    assert Decimal(summary.total_cost_usd) == acknowledged * Decimal(largest)
    after = await fuzzed.exercise(
        "RecordUsage", pb.RecordUsageRequest(user_id=user, request_id="small", cost_usd="0.01")
    )
    if codes[100] == grpc.StatusCode.OK:
        assert after == grpc.StatusCode.OK, "the user's month is not wedged"


async def test_reservations_past_fourteen_digits_are_never_internal_and_add_up(fuzzed: Fuzzed) -> None:
    user = f"fuzz-reserver-{uuid.uuid4().hex[:8]}"
    await fuzzed.broker.provision(user, tier="admin")
    largest = "999999999999.9999999999"
    codes = [
        await fuzzed.exercise("CheckLimit", pb.CheckLimitRequest(user_id=user, estimated_cost_usd=largest))
        for _ in range(101)
    ]
    assert codes[:100] == [grpc.StatusCode.OK] * 100
    check = await fuzzed.broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id=user), metadata=fuzzed.broker.as_agent()
    )
    assert Decimal(check.reserved_usd) == codes.count(grpc.StatusCode.OK) * Decimal(largest)


# Requests that pass validation except for the Duration field under test.
DURATION_BASES: dict[str, Callable[[], Any]] = {
    "RecordUsage": lambda: pb.RecordUsageRequest(
        user_id="fuzz-beta", request_id=f"dur-{uuid.uuid4()}", cost_usd="0.01"
    ),
    "RotateKey": lambda: pb.RotateKeyRequest(user_id="fuzz-free", request_id=f"dur-{uuid.uuid4()}"),
    "RotateKeys": lambda: pb.RotateKeysRequest(dry_run=True),
}
DURATION_FIELDS = [
    (name, field.name)
    for name in UNARY
    for field in METHODS[name].input_type.fields
    if field.message_type is not None and field.message_type.full_name == "google.protobuf.Duration"
]


def test_every_duration_field_has_a_base_request() -> None:
    assert {rpc for rpc, _ in DURATION_FIELDS} <= set(DURATION_BASES)


@pytest.mark.parametrize(("rpc", "field"), DURATION_FIELDS)
async def test_durations_outside_the_documented_range_are_invalid_argument(
    fuzzed: Fuzzed, rpc: str, field: str
) -> None:
    """Negative, past the documented maximum, past the protobuf Duration range, past int64 days."""
    for seconds, nanos in OUT_OF_RANGE_DURATIONS:
        request = DURATION_BASES[rpc]()
        getattr(request, field).CopyFrom(duration_pb2.Duration(seconds=seconds, nanos=nanos))
        code = await fuzzed.exercise(rpc, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (rpc, field, seconds, nanos, code)
