"""The load generator: worker processes (separate from the servers), several channels each.

Closed loop: `concurrency` callers in all, each calling again as soon as its call returns.
Open loop (`rate` set): calls are started on a fixed schedule whatever the server's latency, so a
slow server cannot slow the offered load ("p99 at a steady 500 calls/s").

Every call has a deadline, every loop a bound, every wait for a worker a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

SCENARIOS = {
    "check": "CheckLimit (no estimate)",
    "check_reserve": "CheckLimit (reservation)",
    "get_key": "GetKey",
    "record": "RecordUsage",
    "pair": "CheckLimit+RecordUsage (pair)",
    "summary": "GetUsageSummary",
}
ESTIMATE_USD = "0.000001"
COST_USD = "0.000001"
MAX_CALLS_PER_CALLER = 10_000_000  # a bound on every loop; never reached in practice
MAX_IN_FLIGHT = 2_000  # open loop: beyond this the generator records CLIENT_BACKLOG, not a call
READY_TIMEOUT = 30.0
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel


class LoadError(RuntimeError):
    """A worker process failed or did not answer in time."""


@dataclass(frozen=True)
class LoadSpec:
    target: str
    scenario: str
    users: tuple[str, ...]
    agent_token: str
    admin_token: str
    duration: float = 10.0
    warmup: float = 1.0
    concurrency: int = 64
    processes: int = 2
    channels: int = 4  # per process
    rate: float | None = None  # total calls/s across processes: open loop
    month: str = ""  # GetUsageSummary's month ("" = current)
    timeout: float = 5.0
    release_reservations: bool = False  # give back what check_reserve reserved, after measuring
    tag: str = "bench"  # prefix of request ids, unique per run


@dataclass
class Stats:
    scenario: str
    mode: str
    duration: float
    ok: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    throughput: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    target_rate: float | None = None
    lag_p99_ms: float | None = None
    released: int = 0
    # CPU used inside the measured window by component (server, postgres, loadgen), and per call.
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    cpu_us_per_call: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Caller:
    """One process's stubs and request factory for a scenario."""

    def __init__(self, spec: LoadSpec, index: int, channels: list[grpc.aio.Channel]) -> None:
        self.spec = spec
        self.index = index
        self.agents = [pb_grpc.KeyBrokerStub(ch) for ch in channels]
        self.admins = [pb_grpc.KeyBrokerAdminStub(ch) for ch in channels]
        self.agent_md = (("authorization", f"Bearer {spec.agent_token}"),)
        self.admin_md = (("authorization", f"Bearer {spec.admin_token}"),)
        self.rng = random.Random(index)
        self.seq = 0
        self.reservations: list[tuple[str, str]] = []
        # One method per scenario, named like it (SCENARIOS' keys).
        self.op: Callable[[int], Awaitable[None]] = getattr(self, spec.scenario)

    def _user(self) -> str:
        return self.rng.choice(self.spec.users)

    def _request_id(self) -> str:
        self.seq += 1
        return f"{self.spec.tag}-{self.index}-{self.seq}"

    async def check(self, ch: int) -> None:
        request = pb.CheckLimitRequest(user_id=self._user())
        await self.agents[ch].CheckLimit(request, metadata=self.agent_md, timeout=self.spec.timeout)

    async def _reserve(self, ch: int, user: str, request_id: str) -> str:
        request = pb.CheckLimitRequest(user_id=user, estimated_cost_usd=ESTIMATE_USD, request_id=request_id)
        reply = await self.agents[ch].CheckLimit(request, metadata=self.agent_md, timeout=self.spec.timeout)
        if not reply.allowed:
            raise RuntimeError("NOT_ALLOWED")  # budgets are sized never to run out: count it
        return str(reply.reservation_id)

    async def check_reserve(self, ch: int) -> None:
        user = self._user()
        reservation = await self._reserve(ch, user, self._request_id())
        if self.spec.release_reservations and reservation:
            self.reservations.append((user, reservation))

    async def get_key(self, ch: int) -> None:
        request = pb.GetKeyRequest(user_id=self._user())
        await self.agents[ch].GetKey(request, metadata=self.agent_md, timeout=self.spec.timeout)

    async def _record(self, ch: int, user: str, request_id: str, reservation: str) -> None:
        request = pb.RecordUsageRequest(
            user_id=user,
            request_id=request_id,
            reservation_id=reservation,
            model="openai/gpt-4o-mini",
            agent="bench-agent",
            prompt_tokens=120,
            completion_tokens=80,
            total_tokens=200,
            cost_usd=COST_USD,
        )
        request.duration.FromMilliseconds(850)
        await self.agents[ch].RecordUsage(request, metadata=self.agent_md, timeout=self.spec.timeout)

    async def record(self, ch: int) -> None:
        await self._record(ch, self._user(), self._request_id(), "")

    async def pair(self, ch: int) -> None:
        """What an agent does per LLM call: reserve the estimate, then settle it with the cost."""
        user, request_id = self._user(), self._request_id()
        reservation = await self._reserve(ch, user, request_id)
        await self._record(ch, user, request_id, reservation)

    async def summary(self, ch: int) -> None:
        request = pb.GetUsageSummaryRequest(user_id=self._user(), month=self.spec.month)
        await self.admins[ch].GetUsageSummary(request, metadata=self.admin_md, timeout=self.spec.timeout)

    async def release_all(self, concurrency: int, budget: float) -> int:
        """Untimed clean-up: release the reservations this process made (bounded by `budget`)."""
        pending = list(self.reservations)
        released = 0

        async def releaser(ch: int) -> None:
            nonlocal released
            while pending:
                user, reservation = pending.pop()
                request = pb.ReleaseReservationRequest(user_id=user, reservation_id=reservation)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self.agents[ch].ReleaseReservation(
                        request, metadata=self.agent_md, timeout=self.spec.timeout
                    )
                    released += 1

        workers = [releaser(i % len(self.agents)) for i in range(max(1, concurrency))]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*workers), timeout=budget)
        return released


class Recorder:
    def __init__(self, measure_from: float, end: float) -> None:
        self.measure_from, self.end = measure_from, end
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.errors: Counter[str] = Counter()
        self.samples: list[str] = []

    async def timed(self, caller: Caller, ch: int) -> None:
        started = time.perf_counter()
        try:
            await caller.op(ch)
        except grpc.aio.AioRpcError as exc:
            self.error(exc.code().name, exc.details() or "")
            return
        except Exception as exc:
            self.error(type(exc).__name__, str(exc))
            return
        if self.measure_from <= started < self.end:
            self.latencies.append(time.perf_counter() - started)

    def error(self, code: str, detail: str) -> None:
        self.errors[code] += 1
        if len(self.samples) < 5:
            self.samples.append(f"{code}: {detail[:200]}")


async def closed_loop(caller: Caller, recorder: Recorder, callers: int, channels: int) -> None:
    async def loop(i: int) -> None:
        for _ in range(MAX_CALLS_PER_CALLER):
            if time.perf_counter() >= recorder.end:
                return
            await recorder.timed(caller, i % channels)

    await asyncio.gather(*(loop(i) for i in range(callers)))


async def open_loop(caller: Caller, recorder: Recorder, start: float, rate: float, channels: int) -> None:
    interval = 1.0 / rate
    first = start + interval * caller.index / max(1, caller.spec.processes)  # interleave processes
    total = math.ceil((recorder.end - first) * rate)
    tasks: set[asyncio.Task[None]] = set()
    for k in range(total):
        scheduled = first + k * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if scheduled >= recorder.measure_from:
            recorder.lags.append(time.perf_counter() - scheduled)
        if len(tasks) >= MAX_IN_FLIGHT:
            recorder.error("CLIENT_BACKLOG", f"more than {MAX_IN_FLIGHT} calls in flight")
            continue
        task = asyncio.create_task(recorder.timed(caller, k % channels))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=caller.spec.timeout + 1.0)


async def _worker_main(spec: LoadSpec, index: int, conn: Any) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(spec.target, options=CHANNEL_OPTIONS) for _ in range(spec.channels)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=READY_TIMEOUT)
        caller = Caller(spec, index, channels)
        conn.send("ready")
        if not conn.poll(READY_TIMEOUT):
            raise LoadError("no start time from the parent")
        start_at = float(conn.recv())
        start = time.perf_counter() + max(0.0, start_at - time.time())
        recorder = Recorder(start + spec.warmup, start + spec.warmup + spec.duration)
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        if spec.rate:
            await open_loop(caller, recorder, start, spec.rate / spec.processes, spec.channels)
        else:
            share = spec.concurrency // spec.processes + (index < spec.concurrency % spec.processes)
            await closed_loop(caller, recorder, max(1, share), spec.channels)
        released = 0
        if caller.reservations:
            budget = max(30.0, 3 * spec.duration)
            released = await caller.release_all(max(8, spec.concurrency // spec.processes), budget)
        return {
            "latencies": recorder.latencies,
            "lags": recorder.lags,
            "errors": dict(recorder.errors),
            "samples": recorder.samples,
            "released": released,
        }
    finally:
        for channel in channels:
            await channel.close()


def _worker(spec: LoadSpec, index: int, conn: Any) -> None:
    """Process entry point; always answers the parent (with {"fatal": ...} on failure)."""
    try:
        try:
            import uvloop

            result = uvloop.run(_worker_main(spec, index, conn))
        except ImportError:
            result = asyncio.run(_worker_main(spec, index, conn))
    except BaseException as exc:
        result = {"fatal": f"{type(exc).__name__}: {exc}"}
    with contextlib.suppress(Exception):
        conn.send(result)
    conn.close()


def _receive(conn: Any, deadline: float, what: str) -> Any:
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise LoadError(f"a load generator process did not report {what} in time")
    try:
        message = conn.recv()
    except (EOFError, OSError):
        raise LoadError(f"a load generator process exited before reporting {what}") from None
    if isinstance(message, dict) and "fatal" in message:
        raise LoadError(f"load generator failed: {message['fatal']}")
    return message


Probe = Callable[[list[int]], dict[str, float]]


class WindowProbe:
    """Calls `probe` (cumulative CPU seconds by component) at the start and the end of the
    measured window, from a thread; `delta` is what each component used inside the window."""

    def __init__(self, probe: Probe, pids: list[int], start_at: float, spec: LoadSpec) -> None:
        self.probe, self.pids = probe, pids
        self.begin, self.end = start_at + spec.warmup, start_at + spec.warmup + spec.duration
        self.delta: dict[str, float] = {}
        self.thread = threading.Thread(target=self._run, name="cpu-probe", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        time.sleep(max(0.0, self.begin - time.time()))
        before = self.probe(self.pids)
        time.sleep(max(0.0, self.end - time.time()))
        after = self.probe(self.pids)
        self.delta = {name: round(after[name] - before.get(name, 0.0), 3) for name in after}

    def result(self) -> dict[str, float]:
        self.thread.join(timeout=10.0)
        return self.delta


def run_load(spec: LoadSpec, probe: Probe | None = None) -> Stats:
    """Run one scenario with `spec.processes` fresh worker processes; merge their figures.
    `probe(loadgen_pids)`, if given, measures CPU seconds by component over the window."""
    if not spec.target.startswith("127.0.0.1:"):
        raise LoadError(f"the benchmark only talks to 127.0.0.1, not {spec.target}")
    context = mp.get_context("spawn")  # never fork a process that has gRPC state
    procs: list[Any] = []
    conns: list[Any] = []
    try:
        for index in range(spec.processes):
            parent_end, child_end = context.Pipe()
            proc = context.Process(target=_worker, args=(spec, index, child_end), daemon=True)
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
        ready_deadline = time.monotonic() + READY_TIMEOUT
        for conn in conns:
            _receive(conn, ready_deadline, "ready")
        start_at = time.time() + 0.2
        for conn in conns:
            conn.send(start_at)
        window = WindowProbe(probe, [p.pid for p in procs], start_at, spec) if probe else None
        cleanup = max(30.0, 3 * spec.duration) if spec.release_reservations else 0.0
        done_deadline = time.monotonic() + spec.warmup + spec.duration + spec.timeout + cleanup + 30.0
        results = [_receive(conn, done_deadline, "results") for conn in conns]
        cpu = window.result() if window else {}
    finally:
        for proc in procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
    stats = merge(spec, results)
    stats.cpu_seconds = cpu
    if stats.ok:
        stats.cpu_us_per_call = {k: round(v * 1e6 / stats.ok, 1) for k, v in cpu.items()}
    return stats


def merge(spec: LoadSpec, results: list[dict[str, Any]]) -> Stats:
    latencies = sorted(x for r in results for x in r["latencies"])
    lags = sorted(x for r in results for x in r["lags"])
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result["errors"])
    return Stats(
        scenario=spec.scenario,
        mode=f"open {spec.rate:g}/s" if spec.rate else f"closed c={spec.concurrency}",
        duration=spec.duration,
        ok=len(latencies),
        errors=sum(errors.values()),
        error_codes=dict(errors),
        error_samples=[s for r in results for s in r["samples"]][:5],
        throughput=len(latencies) / spec.duration,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p90_ms=percentile(latencies, 0.90) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        max_ms=(latencies[-1] * 1000) if latencies else 0.0,
        target_rate=spec.rate,
        lag_p99_ms=percentile(lags, 0.99) * 1000 if spec.rate else None,
        released=sum(r["released"] for r in results),
    )
