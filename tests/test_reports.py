"""Cost reports (issue 4 item 2): GetCostReport on a real server, the client method, and the CLI.

Usage is recorded through RecordUsage at moments set on the injected clock, on two UTC days that
fall in two months (2031-01-31 and 2031-02-01), so every figure below is exact and known.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from keybroker.v1 import keybroker_pb2 as pb
from keybroker_client import KeyBrokerClient

from broker.reports import percent_used
from tests.conftest import Broker, TestClock
from tests.helpers import assert_invalid_argument, assert_rpc_error
from tests.test_operator_path import run

JAN_31 = datetime(2031, 1, 31, 22, 15, tzinfo=UTC)
FEB_01 = datetime(2031, 2, 1, 0, 30, tzinfo=UTC)
DAILY = pb.COST_REPORT_KIND_DAILY
MONTHLY = pb.COST_REPORT_KIND_MONTHLY

# (moment, user, model, agent, cost, total_tokens)
USAGE = [
    (JAN_31, "alice", "m/a", "planner", "1.5", 100),
    (JAN_31, "alice", "m/a", "writer", "0.25", 50),  # same model, another agent: one daily row
    (JAN_31, "alice", "m/b", "planner", "0.5", 10),
    (JAN_31, "alice", "m/d", "planner", "0.5", 20),  # ties m/b: ordered by model name
    (JAN_31, "alice", "m/e", "planner", "0.1", 5),  # fourth model: not in the top 3
    (JAN_31, "carol", "m/a", "writer", "0.12345", 7),  # 12.345 % of $1: half-even gives 12.34
    (JAN_31, "dave", "m/b", "planner", "3", 300),  # admin tier: unlimited
    (FEB_01, "alice", "m/c", "planner", "2", 40),
    (FEB_01, "bob", "m/a", "writer", "2.4375", 80),  # 81.25 % of his custom $3
    (FEB_01, "bob", "m/a", "writer", "0", 1),
]


async def record(
    broker: Broker, clock: TestClock, n: int, row: tuple[datetime, str, str, str, str, int]
) -> None:
    moment, user, model, agent, cost, tokens = row
    clock.fixed = moment
    await broker.agent.RecordUsage(
        pb.RecordUsageRequest(
            user_id=user,
            request_id=f"gen-{n}",
            model=model,
            agent=agent,
            cost_usd=cost,
            prompt_tokens=tokens // 2,
            completion_tokens=tokens - tokens // 2,
            total_tokens=tokens,
        ),
        metadata=broker.as_agent(),
        timeout=10,
    )


@pytest.fixture
async def usage(broker: Broker, clock: TestClock) -> Broker:
    clock.fixed = JAN_31
    await broker.provision("alice", tier="free")  # $10
    await broker.provision("bob", tier="standard", limit="3")
    await broker.provision("carol", tier="free", limit="1")
    await broker.provision("dave", tier="admin")
    await broker.provision("erin", tier="free")  # no usage: in no report
    for n, row in enumerate(USAGE):
        await record(broker, clock, n, row)
    return broker


async def report(broker: Broker, kind: int, date_: str = "", month: str = "") -> pb.GetCostReportResponse:
    return await broker.admin.GetCostReport(
        pb.GetCostReportRequest(kind=kind, date=date_, month=month), metadata=broker.as_admin(), timeout=10
    )


def daily_rows(reply: pb.GetCostReportResponse) -> list[tuple[str, str, int, int, str]]:
    return [(r.user_id, r.model, r.requests, r.tokens, r.cost_usd) for r in reply.daily]


def monthly_rows(reply: pb.GetCostReportResponse) -> list[tuple[str, str, str, str, int, list[str]]]:
    return [
        (r.user_id, r.spent_usd, r.limit_usd, r.percent_used, r.requests, list(r.top_models))
        for r in reply.monthly
    ]


async def test_daily_report_per_user_and_model_for_one_utc_day(usage: Broker) -> None:
    jan = await report(usage, DAILY, "2031-01-31")
    assert jan.period == "2031-01-31" and not jan.monthly
    assert daily_rows(jan) == [
        ("dave", "m/b", 1, 300, "3"),
        ("alice", "m/a", 2, 150, "1.75"),
        ("alice", "m/b", 1, 10, "0.5"),
        ("alice", "m/d", 1, 20, "0.5"),
        ("carol", "m/a", 1, 7, "0.12345"),
        ("alice", "m/e", 1, 5, "0.1"),
    ]
    assert jan.total_cost_usd == "5.97345"

    feb = await report(usage, DAILY, "2031-02-01")
    assert daily_rows(feb) == [("bob", "m/a", 2, 81, "2.4375"), ("alice", "m/c", 1, 40, "2")]
    assert feb.total_cost_usd == "4.4375"

    empty = await report(usage, DAILY, "2031-01-30")
    assert empty.period == "2031-01-30" and not empty.daily and empty.total_cost_usd == "0"


async def test_monthly_report_spend_against_limit_with_top_models(usage: Broker) -> None:
    jan = await report(usage, MONTHLY, month="2031-01")
    assert jan.period == "2031-01" and not jan.daily
    assert monthly_rows(jan) == [
        ("dave", "3", "", "", 1, ["m/b=3"]),
        ("alice", "2.85", "10", "28.50", 5, ["m/a=1.75", "m/b=0.5", "m/d=0.5"]),
        ("carol", "0.12345", "1", "12.34", 1, ["m/a=0.12345"]),
    ]
    assert jan.total_cost_usd == "5.97345"

    feb = await report(usage, MONTHLY, month="2031-02")
    assert monthly_rows(feb) == [
        ("bob", "2.4375", "3", "81.25", 2, ["m/a=2.4375"]),
        ("alice", "2", "10", "20.00", 1, ["m/c=2"]),
    ]
    assert feb.total_cost_usd == "4.4375"

    assert not (await report(usage, MONTHLY, month="2030-12")).monthly


async def test_monthly_report_shows_the_current_limit(usage: Broker) -> None:
    await usage.admin.UpdateKey(
        pb.UpdateKeyRequest(user_id="alice", monthly_limit_usd="4"), metadata=usage.as_admin(), timeout=10
    )
    feb = await report(usage, MONTHLY, month="2031-02")
    assert ("alice", "2", "4", "50.00", 1, ["m/c=2"]) in monthly_rows(feb)


async def test_defaults_are_today_and_this_month_by_the_clock(usage: Broker, clock: TestClock) -> None:
    clock.fixed = datetime(2031, 2, 1, 23, 59, 59, tzinfo=UTC)
    daily = await report(usage, DAILY)
    assert daily.period == "2031-02-01" and daily.total_cost_usd == "4.4375"
    monthly = await report(usage, MONTHLY)
    assert monthly.period == "2031-02" and [r.user_id for r in monthly.monthly] == ["bob", "alice"]

    clock.fixed = datetime(2031, 3, 1, 0, 0, tzinfo=UTC)
    assert (await report(usage, DAILY)).period == "2031-03-01"
    nothing = await report(usage, MONTHLY)
    assert nothing.period == "2031-03" and not nothing.monthly and nothing.total_cost_usd == "0"


@pytest.mark.parametrize(
    ("kind", "date_", "month", "field"),
    [
        (pb.COST_REPORT_KIND_UNSPECIFIED, "", "", "kind"),
        (99, "", "", "kind"),
        (DAILY, "2031-02-30", "", "date"),
        (DAILY, "2031-2-1", "", "date"),
        (DAILY, "2031-02-01T00:00", "", "date"),
        (DAILY, "1999-12-31", "", "date"),
        (DAILY, "2031-02-01", "2031-02", "month"),
        (MONTHLY, "", "2031-13", "month"),
        (MONTHLY, "", "2031-02-01", "month"),
        (MONTHLY, "2031-02-01", "", "date"),
    ],
)
async def test_bad_requests_are_invalid_argument_naming_the_field(
    broker: Broker, kind: int, date_: str, month: str, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await report(broker, kind, date_, month)
    assert_invalid_argument(caught.value, field)


async def test_agent_tokens_cannot_read_reports(broker: Broker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.admin.GetCostReport(
            pb.GetCostReportRequest(kind=DAILY), metadata=broker.as_agent(), timeout=10
        )
    assert_rpc_error(caught.value, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")


async def test_client_method(usage: Broker) -> None:
    async with KeyBrokerClient(usage.target, usage.admin_token) as client:
        daily = await client.get_cost_report("daily", date=date(2031, 2, 1))
        monthly = await client.get_cost_report("MONTHLY", month=date(2031, 1, 15))
        by_enum = await client.get_cost_report(MONTHLY, month="2031-02")
    assert daily.period == "2031-02-01" and len(daily.daily) == 2
    assert monthly.period == "2031-01" and monthly.monthly[1].percent_used == "28.50"
    assert by_enum.period == "2031-02"
    with pytest.raises(ValueError, match="daily"):
        await KeyBrokerClient(usage.target, usage.admin_token).get_cost_report("weekly")


@pytest.mark.parametrize(
    ("spent", "limit", "expected"),
    [
        ("0.12345", "1", "12.34"),  # exactly half: to even
        ("0.12355", "1", "12.36"),  # exactly half: to even
        ("0.123450001", "1", "12.35"),  # above half
        ("1", "3", "33.33"),
        ("2", "3", "66.67"),
        ("2.4375", "3", "81.25"),
        ("0", "10", "0.00"),
        ("15", "10", "150.00"),
        # Half-way only past 28 significant digits: Decimal division would round first.
        ("0.1234500000000000000000000000001", "1", "12.35"),
    ],
)
def test_percent_used_is_exact_and_rounds_half_even(spent: str, limit: str, expected: str) -> None:
    percent = percent_used(Decimal(spent), Decimal(limit))
    assert percent is not None and f"{percent:.2f}" == expected


def test_percent_used_is_undefined_without_a_limit() -> None:
    assert percent_used(Decimal(1), None) is None
    assert percent_used(Decimal(0), Decimal(0)) is None


def cli_env(broker: Broker, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OPENROUTER_"))}
    env.update(
        KEYBROKER_LISTEN=broker.target,
        KEYBROKER_TOKEN=broker.admin_token,
        KEYBROKER_DATA_DIR=str(tmp_path / "cli-data"),
    )
    return env


def keybroker(*argv: str) -> list[str]:
    return [sys.executable, "-m", "broker", *argv]


async def test_cli_daily_report_as_csv(usage: Broker, tmp_path: Path) -> None:
    done = await run(
        *keybroker("report", "daily", "--date", "2031-01-31", "--csv"), env=cli_env(usage, tmp_path)
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.reader(io.StringIO(done.stdout)))
    assert rows[0] == ["date", "user_id", "model", "requests", "tokens", "cost_usd"]
    assert rows[1:3] == [
        ["2031-01-31", "dave", "m/b", "1", "300", "3"],
        ["2031-01-31", "alice", "m/a", "2", "150", "1.75"],
    ]
    assert len(rows) == 7
    assert sum(Decimal(r[5]) for r in rows[1:]) == Decimal("5.97345")


async def test_cli_monthly_report_as_json_csv_and_table(usage: Broker, tmp_path: Path) -> None:
    env = cli_env(usage, tmp_path)
    done = await run(*keybroker("report", "monthly", "--month", "2031-01", "--json"), env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["period"] == "2031-01" and data["total_cost_usd"] == "5.97345"
    assert [row["user_id"] for row in data["monthly"]] == ["dave", "alice", "carol"]
    assert data["monthly"][0]["limit_usd"] == "" and data["monthly"][0]["percent_used"] == ""
    assert data["monthly"][1]["top_models"] == ["m/a=1.75", "m/b=0.5", "m/d=0.5"]

    as_csv = await run(*keybroker("report", "monthly", "--month", "2031-01", "--csv"), env=env)
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert rows[0] == {
        "month": "2031-01",
        "user_id": "dave",
        "spent_usd": "3",
        "limit_usd": "",
        "percent_used": "",
        "requests": "1",
        "top_models": "m/b=3",
    }
    assert rows[1]["top_models"] == "m/a=1.75; m/b=0.5; m/d=0.5" and rows[1]["percent_used"] == "28.50"

    table = await run(*keybroker("report", "monthly", "--month", "2031-01"), env=env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "monthly cost report for 2031-01"
    assert lines[2].split() == ["USER_ID", "SPENT_USD", "LIMIT_USD", "PERCENT_USED", "REQUESTS", "TOP_MODELS"]
    assert lines[3].split()[:3] == ["dave", "3", "unlimited"]
    assert lines[4].split()[:4] == ["alice", "2.85", "10", "28.50%"]
    assert lines[-1].split() == ["total_cost_usd", "5.97345"]


async def test_cli_daily_table_has_per_user_totals(usage: Broker, tmp_path: Path) -> None:
    done = await run(*keybroker("report", "daily", "--date", "2031-01-31"), env=cli_env(usage, tmp_path))
    assert done.returncode == 0, done.stderr
    per_user = done.stdout.split("per user:\n", 1)[1].splitlines()
    assert [line.split() for line in per_user[:4]] == [
        ["USER_ID", "REQUESTS", "TOKENS", "COST_USD"],
        ["dave", "1", "300", "3"],
        ["alice", "5", "185", "2.85"],
        ["carol", "1", "7", "0.12345"],
    ]


async def test_cli_rejects_a_bad_date_and_csv_with_json(broker: Broker, tmp_path: Path) -> None:
    env = cli_env(broker, tmp_path)
    bad = await run(*keybroker("report", "daily", "--date", "31.01.2031"), env=env)
    assert bad.returncode == 1 and "date" in bad.stderr and bad.stderr.count("\n") == 1
    both = await run(*keybroker("report", "monthly", "--csv", "--json"), env=env)
    assert both.returncode == 2


# -- paging ---------------------------------------------------------------------------------------


async def all_pages(
    broker: Broker, kind: int, page_size: int, date_: str = "", month: str = ""
) -> list[pb.GetCostReportResponse]:
    pages, token = [], ""
    while True:
        page = await broker.admin.GetCostReport(
            pb.GetCostReportRequest(
                kind=kind, date=date_, month=month, page_size=page_size, page_token=token
            ),
            metadata=broker.as_admin(),
            timeout=10,
        )
        pages.append(page)
        assert len(page.daily) + len(page.monthly) <= page_size
        if not page.next_page_token:
            return pages
        token = page.next_page_token
        assert len(pages) < 100, "paging does not end"


@pytest.mark.parametrize("page_size", [1, 2, 3, 10_000])
async def test_daily_pages_add_up_to_the_whole_report(usage: Broker, page_size: int) -> None:
    whole = await report(usage, DAILY, "2031-01-31")
    assert not whole.next_page_token  # page_size 0: everything at once, as before paging existed
    pages = await all_pages(usage, DAILY, page_size, date_="2031-01-31")
    assert [row for page in pages for row in daily_rows(page)] == daily_rows(whole)
    assert len(pages) == max(1, -(-len(whole.daily) // page_size))
    assert {page.total_cost_usd for page in pages} == {whole.total_cost_usd}  # the whole day's total
    assert {page.period for page in pages} == {"2031-01-31"}


@pytest.mark.parametrize("page_size", [1, 2])
async def test_monthly_pages_add_up_to_the_whole_report(usage: Broker, page_size: int) -> None:
    for month in ("2031-01", "2031-02"):
        whole = await report(usage, MONTHLY, month=month)
        pages = await all_pages(usage, MONTHLY, page_size, month=month)
        assert [row for page in pages for row in monthly_rows(page)] == monthly_rows(whole)
        assert {page.total_cost_usd for page in pages} == {whole.total_cost_usd}


async def test_pages_split_rows_of_equal_cost_without_losing_or_repeating_one(
    broker: Broker, clock: TestClock
) -> None:
    clock.fixed = datetime(2031, 3, 5, 12, 0, tzinfo=UTC)
    users = [f"tie-{n}" for n in range(5)]
    for n, user in enumerate(users):
        await broker.provision(user, tier="free")
        for model in ("m/x", "m/y"):
            await record(
                broker, clock, 100 + 2 * n + (model == "m/y"), (clock.fixed, user, model, "a", "0.5", 9)
            )
    daily = [
        row for page in await all_pages(broker, DAILY, 3, date_="2031-03-05") for row in daily_rows(page)
    ]
    assert [(user, model) for user, model, *_ in daily] == [(u, m) for u in users for m in ("m/x", "m/y")]
    monthly = [
        row for page in await all_pages(broker, MONTHLY, 2, month="2031-03") for row in monthly_rows(page)
    ]
    assert [row[0] for row in monthly] == users and {row[1] for row in monthly} == {"1"}


async def test_the_client_fetches_every_page_into_one_report(usage: Broker) -> None:
    async with KeyBrokerClient(usage.target, token=usage.admin_token) as client:
        whole = await client.get_cost_report("daily", "2031-01-31")
        fetched = await client.fetch_cost_report("daily", "2031-01-31", page_size=2)
        assert daily_rows(fetched) == daily_rows(whole) and fetched.total_cost_usd == whole.total_cost_usd
        first = await client.get_cost_report("monthly", month="2031-01", page_size=1)
        assert len(first.monthly) == 1 and first.next_page_token


@pytest.mark.parametrize("page_size", [-1, 10_001])
async def test_a_page_size_out_of_range_is_invalid(usage: Broker, page_size: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await usage.admin.GetCostReport(
            pb.GetCostReportRequest(kind=DAILY, page_size=page_size), metadata=usage.as_admin(), timeout=10
        )
    assert_invalid_argument(error.value, "page_size")


async def test_a_page_token_of_another_report_or_garbage_is_invalid(usage: Broker) -> None:
    daily = await usage.admin.GetCostReport(
        pb.GetCostReportRequest(kind=DAILY, date="2031-01-31", page_size=1), metadata=usage.as_admin()
    )
    monthly = await usage.admin.GetCostReport(
        pb.GetCostReportRequest(kind=MONTHLY, month="2031-01", page_size=1), metadata=usage.as_admin()
    )
    assert daily.next_page_token and monthly.next_page_token
    wrong = [
        pb.GetCostReportRequest(kind=MONTHLY, month="2031-01", page_token=daily.next_page_token),
        pb.GetCostReportRequest(kind=DAILY, date="2031-02-01", page_token=daily.next_page_token),
        pb.GetCostReportRequest(kind=MONTHLY, month="2031-02", page_token=monthly.next_page_token),
        pb.GetCostReportRequest(kind=DAILY, date="2031-01-31", page_token="not-a-token"),
        pb.GetCostReportRequest(kind=DAILY, date="2031-01-31", page_token=daily.next_page_token[:-3]),
    ]
    for request in wrong:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await usage.admin.GetCostReport(request, metadata=usage.as_admin(), timeout=10)
        assert_invalid_argument(error.value, "page_token")
