"""`make bench`: the broker against a no-op gRPC server, measured in one run (issue 6).

Starts bench/noop_server.py and `python -m broker serve` (embedded PostgreSQL in a temporary
KEYBROKER_DATA_DIR, OpenRouter sandbox in-process), provisions N users through the admin API,
drives both with the same load generator (bench/loadgen.py), and writes bench/results.json and
bench/results.md. `--growth` instead measures RecordUsage, CheckLimit and GetUsageSummary at
growing ledger sizes (bench/growth.json, bench/growth.md).

    python -m bench.run --quick                    # smoke run, 2 s per scenario
    python -m bench.run --growth --growth-rows 0,1000000,5000000
    python -m bench.run --pgbouncer                # broker -> Debian's pgbouncer -> PostgreSQL
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from bench import pgbouncer, report
from bench import procs as P
from bench.loadgen import SCENARIOS, LoadSpec, run_load
from bench.prefill import database_facts, month_start, prefill

BENCH_DIR = Path(__file__).resolve().parent
MAIN_SCENARIOS = ("check", "check_reserve", "get_key", "record", "pair")
CUSTOM_LIMIT = Decimal(1_000_000)
FIXED_ENV = ("KEYBROKER_DATABASE_URL", "KEYBROKER_LISTEN", "KEYBROKER_DATA_DIR")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench", description="keybroker benchmark (issue 6)")
    add = parser.add_argument
    add("--duration", type=float, default=10.0, help="measured seconds per scenario (default 10)")
    add("--warmup", type=float, default=1.0, help="unmeasured seconds before each (default 1)")
    add("--concurrency", type=int, default=64, help="closed-loop callers in all (default 64)")
    add("--users", type=int, default=200, help="users provisioned (default 200)")
    add("--processes", type=int, default=2, help="load generator processes (default 2)")
    add("--channels", type=int, default=4, help="gRPC channels per load process (default 4)")
    add("--quick", action="store_true", help="smoke run: 2 s per scenario, 0.5 s warm-up")
    add("--workers", default="1,2", help="broker worker counts to run, e.g. 1 (default 1,2)")
    add("--scenarios", default=",".join(MAIN_SCENARIOS), help=f"subset of {','.join(MAIN_SCENARIOS)}")
    add("--steady-rate", type=float, default=500.0, help="open-loop CheckLimit calls/s (default 500)")
    add("--prefill", type=int, default=0, metavar="ROWS", help="usage_ledger rows to bulk-load first")
    add("--prefill-months", type=int, default=12, help="past months the prefill spreads over")
    add("--growth", action="store_true", help="p50/p99 at growing ledger sizes instead")
    add("--growth-rows", default="0,1000000,5000000", help="ledger sizes for --growth")
    add("--growth-rate", type=float, default=200.0, help="open-loop calls/s in --growth (default 200)")
    add("--profile", action="store_true", help="py-spy the broker during each scenario (figures skew)")
    add("--profile-native", action="store_true", help="with --profile: C/Cython frames too")
    add("--pgbouncer", action="store_true", help="the broker through pgbouncer (transaction mode)")
    add("--broker-env", action="append", default=[], metavar="K=V", help="extra broker environment")
    add("--out-dir", type=Path, default=BENCH_DIR, help="where results go (default bench/)")
    add("--keep-data", action="store_true", help="keep the temporary data dir and logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 2.0, 0.5
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.growth_rows = sorted({int(r) for r in args.growth_rows.split(",") if r.strip()})
    unknown = [s for s in args.scenarios if s not in MAIN_SCENARIOS]
    if unknown or not args.workers or min(args.workers) < 1:
        parser.error(f"bad --scenarios {unknown} or --workers")
    if args.processes < 1 or args.concurrency < args.processes or args.users < 1:
        parser.error("need --processes >= 1, --concurrency >= --processes, --users >= 1")
    if any("=" not in kv for kv in args.broker_env):
        parser.error("--broker-env takes KEY=VALUE")
    # The benchmark only talks to 127.0.0.1: no real OpenRouter, no outside database.
    names = [kv.split("=", 1)[0] for kv in args.broker_env]
    if any(n.startswith("OPENROUTER_") or n in FIXED_ENV for n in names):
        parser.error(f"--broker-env cannot set OPENROUTER_* or {', '.join(FIXED_ENV)}")
    return args


def user_limits(count: int) -> dict[str, Decimal | None]:
    """Half unlimited (tier admin), half on a custom limit no benchmark can use up (tier beta)."""
    return {f"bench-u{i:05d}": (None if i % 2 == 0 else CUSTOM_LIMIT) for i in range(count)}


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    procs: P.Processes
    env: dict[str, str] = field(default_factory=dict)
    limits: dict[str, Decimal | None] = field(default_factory=dict)
    admin_token: str = ""
    agent_token: str = ""
    broker: P.Proc | None = None
    noop: P.Proc | None = None
    target: str = ""
    bouncer: pgbouncer.PgBouncer | None = None

    @property
    def data_dir(self) -> Path:
        return self.work / "data"

    def dsn(self) -> str:
        found = P.postmaster(self.data_dir)
        if found is None:
            raise P.ProcessError("the broker's embedded PostgreSQL is not running")
        return found[1]

    def prepare(self) -> None:
        extra = dict(kv.split("=", 1) for kv in self.args.broker_env)
        self.env = P.broker_env(self.data_dir, extra)
        self.limits = user_limits(self.args.users)
        say("creating caller tokens (keybroker token create)")
        self.admin_token = P.create_token(self.env, "bench", "admin")
        self.agent_token = P.create_token(self.env, "bench-agent", "agent")
        P.stop_embedded_postgres(self.data_dir)
        if self.args.pgbouncer:
            self.start_pgbouncer()

    def start_pgbouncer(self) -> None:
        """PostgreSQL kept up by this process, pgbouncer in front, the broker pointed at it with
        the asyncpg settings that PgBouncer's version needs (README "PgBouncer")."""
        from broker import embedded

        self.bouncer = bouncer = pgbouncer.start(embedded.start_postgres(self.data_dir))
        cache = "1024" if bouncer.max_prepared_statements else "0"
        self.env.update(
            KEYBROKER_DATABASE_URL=bouncer.dsn("postgres"),
            KEYBROKER_MASTER_KEY=embedded.master_key(self.data_dir),
            KEYBROKER_DB_STATEMENT_CACHE_SIZE=cache,
        )
        version = ".".join(map(str, bouncer.version))
        say(f"pgbouncer {version} on port {bouncer.port}: transaction mode, statement cache {cache}")

    def start_broker(self, workers: int | None) -> None:
        name = f"broker-w{workers or 1}"
        say(f"starting the broker ({name}) on the embedded PostgreSQL")
        self.broker, port = P.start_broker(self.procs, self.env, workers, name)
        self.target = f"127.0.0.1:{port}"

    def stop_broker(self) -> None:
        if self.broker is not None:
            self.procs.stop(self.broker, grace=20.0)
            self.broker = None
        if self.bouncer is None:  # behind pgbouncer, PostgreSQL is this process's, until the end
            P.stop_embedded_postgres(self.data_dir)

    def check_broker(self, target: str) -> None:
        """Fail fast, with its log, when the broker under test has died."""
        broker = self.broker
        if broker is not None and target == self.target and broker.popen.poll() is not None:
            raise P.ProcessError(f"the broker exited ({broker.popen.returncode}):\n{broker.tail()}")

    def cpu_probe(self, target: str) -> Any:
        """Cumulative CPU seconds of the server under test, PostgreSQL and the load generator."""
        server = self.broker if target == self.target else self.noop
        found = P.postmaster(self.data_dir)
        groups = {
            "server": [server.pid] if server else [],
            "postgres": [found[0]] if found and target == self.target else [],
        }
        if self.bouncer is not None and target == self.target:
            groups["pgbouncer"] = [self.bouncer.pid]
        return lambda loadgen: P.cpu_seconds({**groups, "loadgen": loadgen})

    def measure(
        self, target: str, scenario: str, label: str, name: str = "", **overrides: Any
    ) -> dict[str, Any]:
        args = self.args
        spec = LoadSpec(
            target=target,
            scenario=scenario,
            users=tuple(self.limits),
            agent_token=self.agent_token,
            admin_token=self.admin_token,
            duration=args.duration,
            warmup=args.warmup,
            concurrency=args.concurrency,
            processes=args.processes,
            channels=args.channels,
            tag=f"{scenario}-{uuid.uuid4().hex[:8]}",
            **overrides,
        )
        self.check_broker(target)
        profiler = None
        if args.profile and target == self.target and self.broker is not None:
            raw = args.out_dir / "profiles" / f"{label.replace(' ', '_')}-{scenario}.txt"
            raw.parent.mkdir(parents=True, exist_ok=True)
            seconds = spec.warmup + spec.duration + 2.0
            profiler = P.start_profiler(
                self.procs, self.broker.pid, seconds, raw, f"py-spy-{scenario}", args.profile_native
            )
        stats = run_load(spec, self.cpu_probe(target)).as_dict()
        self.check_broker(target)
        if profiler is not None:
            P.wait_profiler(self.procs, profiler, timeout=spec.warmup + spec.duration + 30.0)
            stats["profile"] = report.summarise_profile(raw)
        per_call = stats["cpu_us_per_call"]
        say(
            f"  {label:<8} {name or SCENARIOS[scenario]:<36} {stats['throughput']:8.0f} calls/s  "
            f"p50 {stats['p50_ms']:7.2f} ms  p99 {stats['p99_ms']:7.2f} ms  errors {stats['errors']}  "
            f"CPU µs/call server {per_call.get('server', 0):.0f} pg {per_call.get('postgres', 0):.0f}"
            + (f" pgbouncer {per_call.get('pgbouncer', 0):.0f}" if self.bouncer else "")
        )
        for sample in stats["error_samples"][:2]:
            say(f"           e.g. {sample}")
        return stats


def say(text: str) -> None:
    print(text, flush=True)


async def provision(target: str, token: str, limits: dict[str, Decimal | None]) -> None:
    """ProvisionKey for every user through the admin API (ALREADY_EXISTS counts as done)."""
    metadata = (("authorization", f"Bearer {token}"),)
    gate = asyncio.Semaphore(16)
    async with grpc.aio.insecure_channel(target) as channel:
        admin = pb_grpc.KeyBrokerAdminStub(channel)

        async def one(user: str, limit: Decimal | None) -> None:
            request = pb.ProvisionKeyRequest(
                user_id=user,
                tier="admin" if limit is None else "beta",
                monthly_limit_usd="" if limit is None else str(limit),
                request_id=f"bench-prov-{user}",
            )
            async with gate:
                try:
                    await admin.ProvisionKey(request, metadata=metadata, timeout=30.0)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                        raise

        work = asyncio.gather(*(one(user, limit) for user, limit in limits.items()))
        await asyncio.wait_for(work, timeout=120.0 + 0.5 * len(limits))


def setup_broker(bench: Bench) -> dict[str, Any]:
    """Provision the users and bulk-load the ledger if asked; returns the database facts."""
    args = bench.args
    say(f"provisioning {len(bench.limits)} users through KeyBrokerAdmin/ProvisionKey")
    asyncio.run(provision(bench.target, bench.admin_token, bench.limits))
    if args.prefill and not args.growth:
        say(f"prefilling the usage ledger with {args.prefill:,} rows (COPY)")
        asyncio.run(prefill(bench.dsn(), bench.limits, 0, args.prefill, args.prefill_months, say))
    return asyncio.run(database_facts(bench.dsn()))


def run_main(bench: Bench) -> dict[str, Any]:
    args = bench.args
    supports_workers = P.serve_supports_workers(bench.env)
    bench.noop, noop_port = P.start_noop(bench.procs)
    noop_target = f"127.0.0.1:{noop_port}"
    results: dict[str, Any] = {"noop": {}, "broker": {}, "steady": {}, "notes": []}
    if bench.bouncer is not None:
        cache = bench.env["KEYBROKER_DB_STATEMENT_CACHE_SIZE"]
        results["notes"].append(
            f"broker → PgBouncer {'.'.join(map(str, bench.bouncer.version))} (transaction mode, "
            f"pool 20) → PostgreSQL; KEYBROKER_DB_STATEMENT_CACHE_SIZE={cache}; PgBouncer's own CPU "
            "is in results.json (cpu_us_per_call.pgbouncer), not in the PostgreSQL column"
        )
    facts: dict[str, Any] = {}
    for workers in args.workers:
        if not supports_workers and workers != 1:
            note = f"keybroker serve --workers is not supported yet: {workers} workers not measured"
            say(note)
            results["notes"].append(note)
            continue
        bench.start_broker(workers if supports_workers else None)
        if not facts:
            facts = setup_broker(bench)
        label = f"w{workers}"
        per_rpc = results["broker"].setdefault(str(workers), {})
        for scenario in args.scenarios:
            if scenario not in results["noop"]:
                results["noop"][scenario] = bench.measure(noop_target, scenario, "no-op")
            per_rpc[scenario] = bench.measure(
                bench.target, scenario, label, release_reservations=scenario == "check_reserve"
            )
        if "no-op" not in results["steady"]:
            results["steady"]["no-op"] = bench.measure(noop_target, "check", "no-op", rate=args.steady_rate)
        results["steady"][f"broker, {workers} worker(s)"] = bench.measure(
            bench.target, "check", label, rate=args.steady_rate
        )
        bench.stop_broker()
    results["database"] = facts
    return results


def run_growth(bench: Bench) -> dict[str, Any]:
    args = bench.args
    bench.start_broker(None)
    setup_broker(bench)
    last_month = month_start(datetime.now(UTC).date(), 1).strftime("%Y-%m")
    checks = (
        ("RecordUsage", "record", ""),
        ("CheckLimit (no estimate)", "check", ""),
        ("GetUsageSummary (this month)", "summary", ""),
        (f"GetUsageSummary ({last_month}, prefilled)", "summary", last_month),
    )
    levels: dict[str, dict[str, Any]] = {}
    loaded = 0
    for rows in args.growth_rows:
        if rows > loaded:
            say(f"prefilling the usage ledger to {rows:,} rows (COPY)")
            asyncio.run(prefill(bench.dsn(), bench.limits, loaded, rows - loaded, args.prefill_months, say))
            loaded = rows
        say(f"ledger at {rows:,} prefilled rows, {args.growth_rate:g} calls/s open loop")
        tag = f"{rows // 1000}k"
        levels[str(rows)] = {
            name: bench.measure(bench.target, scenario, tag, name, rate=args.growth_rate, month=month)
            for name, scenario, month in checks
        }
    facts = asyncio.run(database_facts(bench.dsn()))
    bench.stop_broker()
    return {"levels": levels, "database": facts}


def render_main(results: dict[str, Any], command: str) -> str:
    s = results["settings"]
    parts = [
        "# keybroker benchmark\n",
        f"`{command}` — closed loop, {s['concurrency']} callers over {s['processes']} load-generator "
        f"processes × {s['channels']} channels, {s['duration']:g} s measured after {s['warmup']:g} s "
        f"warm-up per scenario; {s['users']} users; {s['prefill']:,} prefilled ledger rows. calls/s "
        "counts successful calls (a CheckLimit+RecordUsage pair counts once); the no-op server "
        "(bench/noop_server.py) was measured in the same run, just before each broker figure.\n",
    ]
    for workers, per_rpc in results["broker"].items():
        parts.append(f"## Broker, {workers} worker(s)\n")
        parts.append(report.throughput_table(per_rpc, results["noop"]) + "\n")
    parts.append(
        "CPU µs/call is the CPU time the server process (all its threads and workers) and "
        "PostgreSQL (all backends) used inside the measured window, divided by the calls: on a "
        "machine shared by client, servers and database it is the figure that the rest of the "
        "machine's load disturbs least.\n"
    )
    parts.append(f"## CheckLimit (no estimate) at a steady {s['steady_rate']:g} calls/s (open loop)\n")
    parts.append(report.steady_table(results["steady"]) + "\n")
    parts.append("## Machine\n")
    parts.append(report.machine_lines(results["machine"]) + "\n")
    parts.append(
        "Client, servers and database share this machine (and it is shared with other work): "
        "compare ratios within one run, not absolute figures across runs.\n"
    )
    parts += [f"- {note}\n" for note in results["notes"]]
    for workers, per_rpc in results["broker"].items():
        for scenario, stats in per_rpc.items():
            if "profile" in stats:
                title = f"## py-spy: {SCENARIOS[scenario]}, {workers} worker(s)\n"
                parts += [title, "```", stats["profile"], "```\n"]
    return "\n".join(parts)


def render_growth(results: dict[str, Any], command: str) -> str:
    s = results["settings"]
    return "\n".join(
        [
            "# keybroker benchmark: ledger growth\n",
            f"`{command}` — open loop at {s['growth_rate']:g} calls/s, {s['duration']:g} s per figure; "
            f"prefilled rows spread over {s['users']} users and the {s['prefill_months']} months before "
            "this one (COPY, then VACUUM ANALYZE). Ratios are to the empty-ledger figure.\n",
            report.growth_table(results["levels"]) + "\n",
            "## Machine\n",
            report.machine_lines(results["machine"]) + "\n",
        ]
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally`: subprocesses get stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    command = "python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    work = Path(tempfile.mkdtemp(prefix="kbbench-"))
    settings = {k: v for k, v in vars(args).items() if k not in ("broker_env", "out_dir")}
    settings["broker_env"] = [kv.split("=", 1)[0] for kv in args.broker_env]  # names only
    code = 1
    try:
        with P.Processes(work / "logs") as procs:
            bench = Bench(args, work, procs)
            try:
                bench.prepare()
                facts = report.machine()
                results = run_growth(bench) if args.growth else run_main(bench)
            finally:
                procs.close()
                if bench.bouncer is not None:
                    bench.bouncer.stop()
                P.stop_embedded_postgres(bench.data_dir)
        results["machine"] = {**facts, **results.pop("database")}
        results["settings"] = settings
        results["command"] = command
        stem, render = ("growth", render_growth) if args.growth else ("results", render_main)
        stem += "-pgbouncer" if args.pgbouncer else ""
        markdown = render(results, command)
        paths = report.write(args.out_dir, stem, results, markdown)
        say("\n" + markdown)
        say(f"wrote {paths[0]} and {paths[1]}")
        code = 0
    except (RuntimeError, grpc.RpcError, asyncpg.PostgresError, OSError, TimeoutError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        print(f"bench: logs in {work / 'logs'} (kept)", file=sys.stderr)
        args.keep_data = True
    finally:
        if args.keep_data:
            say(f"data and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
