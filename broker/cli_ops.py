"""Operator commands that work on the database directly: `keys reseal`, `audit list|verify`."""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import UTC, datetime
from typing import Any

from broker import audit, reseal
from broker.app import Runtime
from broker.config import parse_duration
from broker.storage import tokens_store
from broker.tables import print_json, print_table


def parse_since(text: str) -> datetime:
    """An ISO date or datetime (UTC when it has no zone), or a duration back from now ('24h', '7d')."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        try:
            return datetime.now(UTC) - parse_duration(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a date, datetime or duration: {text!r} (e.g. 2025-01-31, 2025-01-31T12:00Z, 24h, 7d)"
            ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def add_keys_commands(commands: Any) -> None:
    keys = commands.add_parser("keys", help="all stored keys at once (maintenance)").add_subparsers(
        dest="action", required=True
    )
    resealer = keys.add_parser(
        "reseal",
        help="re-seal every stored key under the newest KEYBROKER_MASTER_KEY entry (online, in batches)",
    )
    resealer.add_argument("--batch-size", type=int, default=100, help="rows per transaction (default 100)")
    resealer.add_argument("--json", action="store_true", help="machine-readable output")


def add_audit_commands(audit_commands: Any) -> None:
    verify = audit_commands.add_parser(
        "verify", help="check the audit hash chains; exit 1 naming the first broken row"
    )
    verify.add_argument("--json", action="store_true", help="machine-readable output")


async def keys_command(runtime: Runtime, args: argparse.Namespace) -> int:
    report = await reseal.reseal_all(
        runtime.db, runtime.ring, f"cli:{getpass.getuser()}", args.batch_size, clock=runtime.clock
    )
    if args.json:
        print_json(report.as_dict())
    else:
        ids = sorted({*report.resealed, *report.changed_concurrently, *report.unreadable})
        print_table(
            [
                {
                    "from_kek_id": kek_id,
                    "resealed": report.resealed[kek_id],
                    "changed_concurrently": report.changed_concurrently[kek_id],
                    "unreadable": report.unreadable[kek_id],
                }
                for kek_id in ids
            ],
            ("from_kek_id", "resealed", "changed_concurrently", "unreadable"),
        )
        print(
            f"resealed {report.total_resealed} key(s) under {report.sealing_kek_id!r} "
            f"in {report.batches} batch(es)"
        )
    if not report.ok:
        print(
            "keybroker: error: some stored keys do not open with their key-encryption key; see the log",
            file=sys.stderr,
        )
        return 1
    return 0


async def audit_command(runtime: Runtime, args: argparse.Namespace) -> int:
    if args.action == "verify":
        return await _verify(runtime, args.json)
    rows = await tokens_store.list_audit(runtime.db, args.user, args.limit, args.since)
    data = [row.__dict__ for row in rows]
    if args.json:
        print_json(data)
    else:
        print_table(data, ("event_time", "actor", "action", "user_id", "details"))
    return 0


async def _verify(runtime: Runtime, as_json: bool) -> int:
    result = await audit.verify_chain(runtime.db)
    if as_json:
        broken = result.broken
        print_json(
            {
                "ok": result.ok,
                "rows": result.rows,
                "chains": result.chains,
                "broken": None if broken is None else broken.__dict__,
            }
        )
    elif result.ok:
        print(f"audit chain intact: {result.rows} rows, {result.chains} chains")
    else:
        print(f"audit chain BROKEN at {result.broken}")
    return 0 if result.ok else 1
