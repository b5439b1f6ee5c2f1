"""The `keybroker` command: serve, migrate, sandbox, tokens, keys, usage, audit.

Server-side commands (serve, migrate, token, audit) open the database directly; key and usage
commands are clients of the running broker's gRPC API, exactly like any other caller.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from broker import cli_ops, cli_remote, cli_reports, embedded, logs, tls, workers
from broker.app import open_runtime, run_until_signal, serving
from broker.config import ConfigError, Settings, load_settings
from broker.errors import KeybrokerError
from broker.storage import tokens_store
from broker.tables import print_json, print_table

log = logging.getLogger("keybroker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keybroker", description="Per-user OpenRouter keys over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC broker")
    serve.add_argument("--listen", help="HOST:PORT (default KEYBROKER_LISTEN or 127.0.0.1:50051)")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT), each with its own database pool; "
        "clients need several channels to spread over them (default 1)",
    )
    serve.add_argument(workers.WORKER_FLAG, type=int, help=argparse.SUPPRESS)  # set by the supervisor
    commands.add_parser("migrate", help="apply pending database migrations and exit")
    sandbox = commands.add_parser("sandbox", help="serve the local OpenRouter sandbox API under /api/v1")
    sandbox.add_argument("--listen", default="127.0.0.1:8787", help="HOST:PORT (default 127.0.0.1:8787)")
    sandbox.add_argument("--management-key", required=True, help="the management key callers must send")

    token = commands.add_parser("token", help="caller tokens").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", help="create a token; prints only the token")
    create.add_argument("--name", required=True)
    create.add_argument("--scope", required=True, choices=("agent", "admin"))
    token_list = token.add_parser("list", help="list tokens (never the secrets)")
    token_list.add_argument("--all", action="store_true", help="include revoked tokens")
    _json_flag(token_list)
    token.add_parser("revoke", help="revoke a token by name").add_argument("name")

    _add_key_commands(commands)
    _add_alert_commands(commands)
    usage = commands.add_parser("usage", help="usage reports").add_subparsers(dest="action", required=True)
    summary = usage.add_parser("summary", help="a user's usage in a month")
    summary.add_argument("user")
    summary.add_argument("--month", help="YYYY-MM (default: this month)")
    _remote_flags(summary)
    cli_reports.add_report_commands(commands)

    reconcile = commands.add_parser(
        "reconcile", help="compare OpenRouter's keys with the broker's and repair"
    )
    reconcile.add_argument("--dry-run", action="store_true", help="only report; change nothing")
    _remote_flags(reconcile)

    audit = commands.add_parser("audit", help="audit log").add_subparsers(dest="action", required=True)
    audit_list = audit.add_parser("list", help="latest audit events")
    audit_list.add_argument("--user")
    audit_list.add_argument("--limit", type=int, default=50)
    audit_list.add_argument(
        "--since", type=cli_ops.parse_since, help="ISO date/datetime (UTC if no zone) or a duration: 24h, 7d"
    )
    _json_flag(audit_list)
    cli_ops.add_audit_commands(audit)
    cli_ops.add_keys_commands(commands)
    return parser


def _add_key_commands(commands: Any) -> None:
    key = commands.add_parser("key", help="users' OpenRouter keys").add_subparsers(
        dest="action", required=True
    )
    create = key.add_parser("create-user", help="provision a key for a new user")
    create.add_argument("user")
    create.add_argument("--tier", default="free")
    create.add_argument("--limit", help="custom monthly limit in USD")
    create.add_argument("--request-id", help="idempotency key (default: random)")
    rotate = key.add_parser("rotate-user", help="rotate a user's key")
    rotate.add_argument("user")
    rotate.add_argument(
        "--delete-old", action="store_true", help="delete the old key instead of disabling it"
    )
    rotate.add_argument("--grace", type=float, default=0.0, help="seconds the old key keeps working")
    rotate.add_argument("--request-id", help="idempotency key (default: random)")
    key.add_parser("status", help="one user's key").add_argument("user")
    key.add_parser("list", help="every user's key")
    update = key.add_parser("update", help="change tier, limit, or suspend/resume")
    update.add_argument("user")
    update.add_argument("--tier")
    update.add_argument("--limit", help="custom monthly limit in USD; '' removes it")
    state = update.add_mutually_exclusive_group()
    state.add_argument("--disable", dest="disabled", action="store_const", const=True)
    state.add_argument("--enable", dest="disabled", action="store_const", const=False)
    revoke = key.add_parser("revoke", help="revoke a user's key")
    revoke.add_argument("user")
    revoke.add_argument("--delete", action="store_true", help="delete at OpenRouter instead of disabling")
    due = key.add_parser("rotate-due", help="rotate keys older than --older-than (for cron)")
    due.add_argument("--older-than", help="e.g. 30d (default KEYBROKER_ROTATE_AFTER)")
    rotate_all = key.add_parser("rotate-all", help="rotate every active key (for cron)")
    for sub in (due, rotate_all):
        sub.add_argument("--grace", default="1h", help="grace of each old key, e.g. 10m (default 1h)")
        sub.add_argument("--delete-old", action="store_true", help="delete old keys instead of disabling")
        sub.add_argument("--dry-run", action="store_true", help="only list the users")
    for sub in key.choices.values():
        _remote_flags(sub)


def _add_alert_commands(commands: Any) -> None:
    alerts = commands.add_parser("alerts", help="usage alerts").add_subparsers(dest="action", required=True)
    alert_list = alerts.add_parser("list", help="usage alerts, newest first, with their delivery state")
    alert_list.add_argument("--user", help="only this user's alerts")
    alert_list.add_argument("--kind", choices=("threshold", "anomaly"))
    alert_list.add_argument(
        "--undelivered", action="store_true", help="only alerts not yet delivered to every webhook"
    )
    alert_list.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    _remote_flags(alert_list)


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _remote_flags(parser: argparse.ArgumentParser) -> None:
    _json_flag(parser)
    parser.add_argument("--target", help="broker address (default KEYBROKER_LISTEN)")
    parser.add_argument("--token", help="caller token (default KEYBROKER_TOKEN, or the embedded dev token)")


REMOTE: dict[tuple[str, str], Callable[[Any, argparse.Namespace], Awaitable[None]]] = {
    ("key", "create-user"): cli_remote.create_user,
    ("key", "rotate-user"): cli_remote.rotate_user,
    ("key", "status"): cli_remote.status,
    ("key", "list"): cli_remote.list_keys,
    ("key", "update"): cli_remote.update_user,
    ("key", "revoke"): cli_remote.revoke_user,
    ("usage", "summary"): cli_remote.usage_summary,
    ("alerts", "list"): cli_remote.list_alerts,
    ("report", "daily"): cli_reports.daily_report,
    ("report", "monthly"): cli_reports.monthly_report,
    ("reconcile", ""): cli_remote.reconcile,
    ("key", "rotate-due"): cli_remote.rotate_due,
    ("key", "rotate-all"): cli_remote.rotate_all,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        logs.configure(settings.log_level, settings.log_format)
        return run_async(dispatch(args, settings))
    except KeyboardInterrupt:
        return 130
    except (ConfigError, KeybrokerError, LookupError, ValueError) as exc:
        print(f"keybroker: error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # client errors carry a reason; anything else is a one-liner too
        reason = getattr(exc, "reason", type(exc).__name__)
        print(f"keybroker: error: {reason}: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1


def run_async(work: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed (faster gRPC and database I/O), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(work)
    return int(uvloop.run(work))


async def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    remote = REMOTE.get((args.command, getattr(args, "action", "")))
    if remote is not None:
        return await run_remote(remote, args, settings)
    if args.command == "serve":
        settings = settings.with_overrides(listen=args.listen) if args.listen else settings
        return await serve(settings, args.workers, args.pool_worker)
    if args.command == "sandbox":
        from broker.sandbox import run_sandbox

        await run_sandbox(args.listen, args.management_key)
        return 0
    async with open_runtime(settings, apply_migrations=True) as runtime:
        if args.command == "migrate":
            print("database is up to date")
        elif args.command == "token":
            return await token_command(runtime, args)
        elif args.command == "audit":
            return await cli_ops.audit_command(runtime, args)
        elif args.command == "keys":
            return await cli_ops.keys_command(runtime, args)
    return 0


async def token_command(runtime: Any, args: argparse.Namespace) -> int:
    actor = f"cli:{getpass.getuser()}"
    if args.action == "create":
        try:
            issued = await runtime.authority.create(args.name, args.scope, actor)
        except tokens_store.TokenNameTaken:
            raise ValueError(f"a live token named {args.name!r} exists; revoke it first") from None
        print(issued.token)
    elif args.action == "list":
        rows = await tokens_store.list_tokens(runtime.db, include_revoked=args.all)
        data = [
            {
                "name": r.name,
                "scope": r.scope,
                "token_id": r.token_id,
                "create_time": r.create_time,
                "revoke_time": r.revoke_time,
            }
            for r in rows
        ]
        print_json(data) if args.json else print_table(
            data, ("name", "scope", "token_id", "create_time", "revoke_time")
        )
    elif args.action == "revoke":
        if not await runtime.authority.revoke(args.name, actor):
            raise LookupError(f"no live token named {args.name!r}")
        print(f"revoked {args.name}")
    return 0


async def serve(settings: Settings, worker_count: int = 1, pool_worker: int | None = None) -> int:
    """One server process; or, with `worker_count` > 1, the supervisor of that many (each then
    runs this with `pool_worker` set: SO_REUSEPORT on, no dev token, no grpcurl example)."""
    if worker_count > 1 and pool_worker is None:
        return await workers.supervise(settings, worker_count, announce_dev_token)
    reuse_port = pool_worker is not None
    async with open_runtime(settings) as runtime, serving(runtime, reuse_port=reuse_port) as server:
        if pool_worker is not None:
            await workers.run_worker(server)
            return 0
        if settings.embedded_database:
            host = settings.listen.rsplit(":", 1)[0]
            await announce_dev_token(runtime, f"{host}:{server.port}")
        await run_until_signal(server)
    return 0


async def announce_dev_token(runtime: Any, target: str) -> None:
    """Embedded mode: make sure the dev token works, and print how to call the broker with it."""
    data_dir = runtime.settings.data_dir
    await dev_token(runtime, data_dir)
    print_grpcurl_example(target, data_dir / embedded.DEV_TOKEN_FILE)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


async def dev_token(runtime: Any, data_dir: Path) -> str:
    """The embedded mode's admin token, kept in the data dir (mode 0600) across restarts."""
    path = data_dir / embedded.DEV_TOKEN_FILE
    token = embedded.read_or_create_secret_file(path, create=False, make="")
    if token and await _token_works(runtime, token):
        return token
    await runtime.authority.revoke("dev", "system")
    issued = await runtime.authority.create("dev", "admin", "system")
    path.unlink(missing_ok=True)
    embedded.read_or_create_secret_file(path, create=True, make=issued.token)
    return str(issued.token)


async def _token_works(runtime: Any, token: str) -> bool:
    try:
        await runtime.authority.authenticate(f"Bearer {token}")
    except KeybrokerError:
        return False
    return True


def print_grpcurl_example(target: str, token_file: Path) -> None:
    print(
        "\nkeybroker is running on the embedded defaults (development only).\n"
        f"A development admin token is in {token_file} (mode 0600). Try:\n\n"
        f"  export KEYBROKER_TOKEN=$(cat {token_file})\n"
        f'  grpcurl -plaintext -H "authorization: Bearer $KEYBROKER_TOKEN" \\\n'
        f'    -d \'{{"user_id": "alice", "tier": "free", "request_id": "r1"}}\' \\\n'
        f"    {target} keybroker.v1.KeyBrokerAdmin/ProvisionKey\n"
        f'  grpcurl -plaintext -H "authorization: Bearer $KEYBROKER_TOKEN" \\\n'
        f'    -d \'{{"user_id": "alice"}}\' {target} keybroker.v1.KeyBroker/CheckLimit\n',
        flush=True,
    )


async def run_remote(
    command: Callable[[Any, argparse.Namespace], Awaitable[None]],
    args: argparse.Namespace,
    settings: Settings,
) -> int:
    from keybroker_client import KeyBrokerClient

    token = args.token or settings.cli_token
    if not token and settings.embedded_database:
        token = embedded.read_or_create_secret_file(settings.data_dir / embedded.DEV_TOKEN_FILE, False, "")
    if not token:
        raise ConfigError("no caller token: pass --token or set KEYBROKER_TOKEN")
    args.settings = settings
    credentials = tls.channel_credentials(settings)  # TLS when KEYBROKER_TLS_CA is set
    async with KeyBrokerClient(
        args.target or settings.listen, token, timeout=10.0, credentials=credentials
    ) as client:
        await command(client, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
