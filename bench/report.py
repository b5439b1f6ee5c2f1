"""Figures into words: the machine, markdown tables, results files, py-spy summaries."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from collections import Counter
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.loadgen import SCENARIOS


def machine() -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cpu = ""
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1) if match else ""
    except OSError:
        pass
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "asyncpg": version("asyncpg"),
        "uvloop": version("uvloop"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.decode("utf-8", "replace").strip()


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _errors(stats: dict[str, Any]) -> str:
    if not stats["errors"]:
        return "0"
    codes = ", ".join(f"{code} {n}" for code, n in sorted(stats["error_codes"].items()))
    return f"{stats['errors']} ({codes})"


def throughput_table(broker: dict[str, dict[str, Any]], noop: dict[str, dict[str, Any]]) -> str:
    """Per RPC: throughput, latency, errors, the ratio to the no-op server, and CPU per call
    (CPU per call is the figure least disturbed by other work on a shared machine)."""
    lines = [
        "| RPC | calls/s | p50 ms | p99 ms | errors | no-op calls/s | ratio to no-op "
        "| broker CPU µs/call | PostgreSQL CPU µs/call | no-op CPU µs/call |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for scenario, stats in broker.items():
        base = noop.get(scenario)
        base_rate = f"{base['throughput']:.0f}" if base else "–"
        ratio = "–"
        if base and base["throughput"]:
            ratio = f"{stats['throughput'] / base['throughput']:.2f}×"
        cpu = stats.get("cpu_us_per_call", {})
        base_cpu = (base or {}).get("cpu_us_per_call", {})
        lines.append(
            f"| {SCENARIOS[scenario]} | {stats['throughput']:.0f} | {_ms(stats['p50_ms'])} | "
            f"{_ms(stats['p99_ms'])} | {_errors(stats)} | {base_rate} | {ratio} | "
            f"{_us(cpu.get('server'))} | {_us(cpu.get('postgres'))} | {_us(base_cpu.get('server'))} |"
        )
    return "\n".join(lines)


def _us(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def steady_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| server | offered calls/s | achieved calls/s | p50 ms | p90 ms | p99 ms | max ms | errors "
        "| generator lag p99 ms | server CPU µs/call | PostgreSQL CPU µs/call |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, stats in rows.items():
        cpu = stats.get("cpu_us_per_call", {})
        lines.append(
            f"| {name} | {stats['target_rate']:g} | {stats['throughput']:.0f} | {_ms(stats['p50_ms'])} | "
            f"{_ms(stats['p90_ms'])} | {_ms(stats['p99_ms'])} | {_ms(stats['max_ms'])} | "
            f"{_errors(stats)} | {_ms(stats['lag_p99_ms'])} | {_us(cpu.get('server'))} | "
            f"{_us(cpu.get('postgres'))} |"
        )
    return "\n".join(lines)


def growth_table(levels: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One row per (scenario, ledger size): p50/p99 and their ratio to the empty-ledger figure."""
    lines = [
        "| RPC | ledger rows | calls/s | p50 ms | p99 ms | p50 ratio | p99 ratio | errors "
        "| broker CPU µs/call | PostgreSQL CPU µs/call |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    first = next(iter(levels.values()), {})
    for label in first:
        base = first[label]
        for rows, by_label in levels.items():
            stats = by_label.get(label)
            if stats is None:
                continue
            p50 = stats["p50_ms"] / base["p50_ms"] if base["p50_ms"] else 0.0
            p99 = stats["p99_ms"] / base["p99_ms"] if base["p99_ms"] else 0.0
            cpu = stats.get("cpu_us_per_call", {})
            lines.append(
                f"| {label} | {int(rows):,} | {stats['throughput']:.0f} | {_ms(stats['p50_ms'])} | "
                f"{_ms(stats['p99_ms'])} | {p50:.2f}× | {p99:.2f}× | {_errors(stats)} | "
                f"{_us(cpu.get('server'))} | {_us(cpu.get('postgres'))} |"
            )
    return "\n".join(lines)


def machine_lines(facts: dict[str, Any]) -> str:
    keys = (
        *("cores", "usable_cores", "cpu", "platform", "python", "grpcio", "protobuf", "asyncpg"),
        *("uvloop", "postgres", "database_size", "load_average", "commit", "dirty", "time"),
    )
    return "\n".join(f"- {key}: {facts.get(key)}" for key in keys if key in facts)


def write(out_dir: Path, stem: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n", "utf-8")
    md_path.write_text(markdown, "utf-8")
    return json_path, md_path


_FRAME = re.compile(r"^(?P<name>.*) \((?P<path>[^()]*?)(?::\d+)?\)$")
# Frames whose own time is really C code underneath them (Cython callbacks have no Python frame).
_C_UNDERNEATH = {
    "Runner.run (asyncio/runners.py)": "event loop: uvloop + gRPC Cython (serialization, C-core)",
    "Thread.run (threading.py)": "gRPC aio poller thread",
}


def _parse(frame: str) -> tuple[str, str]:
    """'func (asyncpg/connection.py:12)' -> ('func (asyncpg/connection.py)', 'asyncpg')."""
    match = _FRAME.match(frame)
    if not match:
        return frame, frame.split(" ", 1)[0]
    path = match.group("path")
    component = path.split("/", 1)[0] if "/" in path else path.removesuffix(".py")
    return f"{match.group('name')} ({path})", component


def summarise_profile(raw: Path, top: int = 12) -> str:
    """A py-spy raw (collapsed) profile in brief: own time by function and by component, and
    inclusive time of the broker's own functions; in % of samples (idle waits are not sampled
    unless --native was used)."""
    own: Counter[str] = Counter()
    components: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    try:
        text = raw.read_text("utf-8", errors="replace")
    except OSError:
        return "(no profile)"
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_parse(f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        leaf, component = frames[-1]
        own[leaf] += count
        components[_C_UNDERNEATH.get(leaf, component)] += count
        for name in {name for name, comp in frames if comp == "broker"}:
            inclusive[name] += count
    if not total:
        return "(no samples)"

    def block(title: str, counter: Counter[str]) -> list[str]:
        return [title] + [f"  {100 * n / total:5.1f}%  {k}" for k, n in counter.most_common(top)]

    lines = [f"samples: {total}"]
    lines += block("own time by component:", components)
    lines += block("own time by function:", own)
    lines += block("inclusive time of broker functions:", inclusive)
    return "\n".join(lines)
