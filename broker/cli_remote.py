"""Command-line operations that go through the running broker's gRPC API (like any client)."""

from __future__ import annotations

import argparse
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from keybroker.v1 import keybroker_pb2 as pb
from keybroker_client import KeyBrokerClient

from broker.config import parse_duration
from broker.tables import print_json, print_record, print_table

KEY_COLUMNS = ("user_id", "tier", "status", "limit_usd", "spent_usd", "key_version", "key_id")


def as_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def key_row(info: pb.KeyInfo) -> dict[str, Any]:
    row = as_dict(info)
    row["status"] = pb.KeyStatus.Name(info.status).removeprefix("KEY_STATUS_").lower()
    row["limit_usd"] = "unlimited" if info.unlimited else info.limit_usd
    return row


def show_key(info: pb.KeyInfo, as_json: bool) -> None:
    if as_json:
        print_json(key_row(info))
    else:
        print_record(
            {column: key_row(info).get(column) for column in (*KEY_COLUMNS, "create_time", "rotate_time")}
        )


async def create_user(client: KeyBrokerClient, args: argparse.Namespace) -> None:
    reply = await client.provision_key(
        user_id=args.user,
        tier=args.tier,
        monthly_limit_usd=Decimal(args.limit) if args.limit else None,
        request_id=args.request_id or f"cli-{uuid.uuid4()}",
        timeout=30,
    )
    show_key(reply.key, args.json)


async def rotate_user(client: KeyBrokerClient, args: argparse.Namespace) -> None:
    reply = await client.rotate_key(
        user_id=args.user,
        request_id=args.request_id or f"cli-{uuid.uuid4()}",
        grace_period=timedelta(seconds=args.grace),
        delete_old=args.delete_old,
        timeout=30,
    )
    record = as_dict(reply)
    print_json(record) if args.json else print_record(record)


async def status(client: KeyBrokerClient, args: argparse.Namespace) -> None:
    reply = await client.get_key_info(args.user)
    show_key(reply.key, args.json)


async def list_keys(client: KeyBrokerClient, args: argparse.Namespace) -> None:
    rows = [key_row(info) async for info in client.iter_keys()]
    print_json(rows) if args.json else print_table(rows, KEY_COLUMNS)


ALERT_COLUMNS = (
    "create_time", "user_id", "kind", "month", "threshold_percent", "spent_usd", "reference_usd",
    "attempts", "deliver_time", "last_error", "alert_id",
)  # fmt: skip


async def list_alerts(client: KeyBrokerClient, args: argparse.Namespace) -> None:
    if args.limit < 1:
        raise ValueError("--limit must be at least 1")
    rows: list[dict[str, Any]] = []
    async for alert in client.iter_alerts(
        user_id=args.user, kind=args.kind, undelivered_only=args.undelivered, page_size=min(args.limit, 1000)
    ):
        row = as_dict(alert)
        row.setdefault("deliver_time", None)  # unset while undelivered
        row["kind"] = pb.AlertKind.Name(alert.kind).removeprefix("ALERT_KIND_").lower()
        if alert.kind != pb.ALERT_KIND_THRESHOLD:
            row["threshold_percent"] = None
        rows.append(row)
        if len(rows) >= args.limit:
            break
    print_json(rows) if args.json else print_table(rows, ALERT_COLUMNS)


async def update_user(client: KeyBrokerClient, args: argparse.Namespace) -> None:
    reply = await client.update_key(
        user_id=args.user,
        tier=args.tier,
        monthly_limit_usd=args.limit,
        disabled=args.disabled,
        timeout=30,
    )
    show_key(reply.key, args.json)


async def revoke_user(client: KeyBrokerClient, args: argparse.Namespace) -> None:
    reply = await client.revoke_key(user_id=args.user, delete=args.delete, timeout=30)
    show_key(reply.key, args.json)


async def usage_summary(client: KeyBrokerClient, args: argparse.Namespace) -> None:
    reply = await client.get_usage_summary(user_id=args.user, month=args.month or "")
    if args.json:
        print_json(as_dict(reply))
        return
    print_record(
        {
            "user_id": args.user,
            "month": reply.month,
            "requests": reply.total_requests,
            "tokens": reply.total_tokens,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "cost_usd": reply.total_cost_usd,
        }
    )
    for title, groups, name in (("by model", reply.by_model, "model"), ("by agent", reply.by_agent, "agent")):
        print(f"\n{title}:")
        print_table([as_dict(g) for g in groups], (name, "requests", "tokens", "cost_usd"))


async def reconcile(client: KeyBrokerClient, args: argparse.Namespace) -> None:
    reply = await client.reconcile(dry_run=args.dry_run)
    if args.json:
        print_json(as_dict(reply))
        return
    print(
        f"reconcile{' (dry run: nothing changed)' if reply.dry_run else ''}: "
        f"{reply.provider_keys} keys at OpenRouter, {reply.database_keys} in the database"
    )
    rows = [
        {
            **as_dict(f),
            "kind": pb.ReconcileFindingKind.Name(f.kind).removeprefix("RECONCILE_FINDING_KIND_").lower(),
        }
        for f in reply.findings
    ]
    print_table(rows, ("kind", "user_id", "key_id", "provider_usd", "broker_usd", "fixed", "detail"))


async def rotate_due(client: KeyBrokerClient, args: argparse.Namespace) -> None:
    if args.older_than:
        older_than = parse_duration(args.older_than)
    elif args.settings.rotate_after is not None:
        older_than = args.settings.rotate_after
    else:
        raise ValueError("give --older-than or set KEYBROKER_ROTATE_AFTER")
    await _rotate_keys(client, args, older_than)


async def rotate_all(client: KeyBrokerClient, args: argparse.Namespace) -> None:
    await _rotate_keys(client, args, timedelta(0))


async def _rotate_keys(client: KeyBrokerClient, args: argparse.Namespace, older_than: timedelta) -> None:
    reply = await client.rotate_keys(
        older_than=older_than,
        grace_period=parse_duration(args.grace),
        delete_old=args.delete_old,
        dry_run=args.dry_run,
    )
    if args.json:
        print_json(as_dict(reply))
    else:
        verb = "would rotate" if args.dry_run else "rotated"
        print(f"{verb} {len(reply.rotated_user_ids)} keys: {', '.join(reply.rotated_user_ids) or '-'}")
        for failure in reply.failures:
            print(f"failed: {failure.user_id} ({failure.reason})")
    if reply.failures:
        raise LookupError(f"{len(reply.failures)} rotations failed")
