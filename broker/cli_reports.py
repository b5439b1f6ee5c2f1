"""`keybroker report daily|monthly`: cost reports through the broker's GetCostReport RPC.

Three outputs: aligned tables for people, CSV for spreadsheets (one header row, one line per row,
exact decimal strings, no totals line so a column sums to the total), and --json (the RPC's
response in the proto JSON mapping, as grpcurl prints it).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from keybroker.v1 import keybroker_pb2 as pb
from keybroker_client import KeyBrokerClient

from broker.cli_remote import as_dict
from broker.money import format_usd
from broker.reports import DailyRow, user_day_totals
from broker.tables import print_json, print_table

DAILY_COLUMNS = ("user_id", "model", "requests", "tokens", "cost_usd")
USER_COLUMNS = ("user_id", "requests", "tokens", "cost_usd")
MONTHLY_COLUMNS = ("user_id", "spent_usd", "limit_usd", "percent_used", "requests", "top_models")


def add_report_commands(commands: Any) -> None:
    report = commands.add_parser("report", help="cost reports").add_subparsers(dest="action", required=True)
    daily = report.add_parser("daily", help="cost, requests and tokens per user and model for one UTC day")
    daily.add_argument("--date", default="", help="YYYY-MM-DD, UTC (default: today)")
    monthly = report.add_parser("monthly", help="per user: spend against the limit, %% used, top models")
    monthly.add_argument("--month", default="", help="YYYY-MM (default: this month)")
    for sub in (daily, monthly):
        output = sub.add_mutually_exclusive_group()
        output.add_argument("--csv", action="store_true", help="CSV with a header row, for spreadsheets")
        output.add_argument("--json", action="store_true", help="machine-readable output")
        sub.add_argument("--target", help="broker address (default KEYBROKER_LISTEN)")
        sub.add_argument("--token", help="caller token (default KEYBROKER_TOKEN, or the embedded dev token)")


async def daily_report(client: KeyBrokerClient, args: argparse.Namespace) -> None:
    reply = await client.fetch_cost_report("daily", date=args.date or None)
    if args.json:
        print_json(as_dict(reply))
    elif args.csv:
        write_csv(
            ("date", *DAILY_COLUMNS),
            ((reply.period, r.user_id, r.model, r.requests, r.tokens, r.cost_usd) for r in reply.daily),
        )
    else:
        print(f"daily cost report for {reply.period} (UTC)\n")
        print_table([daily_row(r) for r in reply.daily], DAILY_COLUMNS)
        print("\nper user:")
        print_table(user_totals(reply.daily), USER_COLUMNS)
        print(f"\ntotal_cost_usd  {reply.total_cost_usd}")


async def monthly_report(client: KeyBrokerClient, args: argparse.Namespace) -> None:
    reply = await client.fetch_cost_report("monthly", month=args.month or None)
    if args.json:
        print_json(as_dict(reply))
    elif args.csv:
        write_csv(
            ("month", *MONTHLY_COLUMNS),
            (
                (
                    reply.period,
                    r.user_id,
                    r.spent_usd,
                    r.limit_usd,
                    r.percent_used,
                    r.requests,
                    "; ".join(r.top_models),
                )
                for r in reply.monthly
            ),
        )
    else:
        print(f"monthly cost report for {reply.period}\n")
        print_table([monthly_row(r) for r in reply.monthly], MONTHLY_COLUMNS)
        print(f"\ntotal_cost_usd  {reply.total_cost_usd}")


def write_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)


def daily_row(row: pb.DailyCostRow) -> dict[str, Any]:
    return {
        "user_id": row.user_id,
        "model": row.model,
        "requests": row.requests,
        "tokens": row.tokens,
        "cost_usd": row.cost_usd,
    }


def monthly_row(row: pb.MonthlyCostRow) -> dict[str, Any]:
    return {
        "user_id": row.user_id,
        "spent_usd": row.spent_usd,
        "limit_usd": row.limit_usd or "unlimited",
        "percent_used": f"{row.percent_used}%" if row.percent_used else "",
        "requests": row.requests,
        "top_models": ", ".join(row.top_models),
    }


def user_totals(rows: Iterable[pb.DailyCostRow]) -> list[dict[str, Any]]:
    """Per user over all models, highest cost first (the domain's rule, on the reply's rows)."""
    totals = user_day_totals(
        [DailyRow(r.user_id, r.model, r.requests, r.tokens, Decimal(r.cost_usd)) for r in rows]
    )
    return [
        {"user_id": u.user_id, "requests": u.requests, "tokens": u.tokens, "cost_usd": format_usd(u.cost_usd)}
        for u in totals
    ]
