"""`keybroker serve --workers N`: several processes on one port (SO_REUSEPORT), run as a real
subprocess against a test database and the sandbox.

That both workers serve is shown from the kernel's side, without any debug RPC: /proc/net/tcp
lists one listening socket per worker on the same port, and the server ends of the clients'
connections belong to both worker processes.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from broker import crypto
from broker.auth import TokenAuthority
from broker.clock import system_clock
from broker.config import Settings
from broker.db import Database
from broker.sandbox import Sandbox
from broker.workers import metrics_listen

LISTENING = re.compile(r"listening on port (\d+) \(pid (\d+)\)")
TCP_LISTEN, TCP_ESTABLISHED = "0A", "01"
CHANNELS = 16
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_sockets(port: int, state: str) -> set[int]:
    """Inodes of the TCP sockets bound locally to `port` in `state` (from /proc/net/tcp*)."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == state:
                inodes.add(int(fields[9]))
    return inodes


def socket_owners(inodes: set[int], pids: set[int]) -> dict[int, set[int]]:
    """For each pid, which of `inodes` it holds open."""
    owners: dict[int, set[int]] = {}
    for pid in pids:
        held: set[int] = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            match = re.fullmatch(r"socket:\[(\d+)\]", target)
            if match and int(match.group(1)) in inodes:
                held.add(int(match.group(1)))
        owners[pid] = held
    return owners


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


@dataclass
class Pool:
    """The supervisor process, its stderr (drained continuously: the workers share it), and the
    workers it announced."""

    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    workers: dict[int, int] = field(default_factory=dict)  # pid -> port
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False

    async def drain(self) -> None:
        assert self.proc.stderr is not None
        while line := (await self.proc.stderr.readline()).decode("utf-8", "replace"):
            self.lines.append(line)
            found = LISTENING.search(line)
            if found:
                self.workers[int(found.group(2))] = int(found.group(1))
            self.changed.set()
        self.ended = True
        self.changed.set()

    async def wait_workers(self, count: int, timeout: float = 90) -> dict[int, int]:
        async def scan() -> None:
            while len(self.workers) < count:
                if self.ended:
                    raise AssertionError("the pool ended before its workers listened:\n" + self.log())
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(scan(), timeout)
        return dict(self.workers)

    def log(self) -> str:
        return "".join(self.lines[-60:])


def pool_env(database_url: str, sandbox: Sandbox, data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OPENROUTER_"))}
    env.update(
        KEYBROKER_DATABASE_URL=database_url,
        KEYBROKER_MASTER_KEY=crypto.generate_master_key(),
        KEYBROKER_DATA_DIR=str(data_dir),
        KEYBROKER_LISTEN=f"127.0.0.1:{port}",
        KEYBROKER_SHUTDOWN_GRACE="2",
        KEYBROKER_RECONCILE_INTERVAL="0",
        KEYBROKER_METRICS_LISTEN="off",  # each worker's port is test_each_worker_gets_its_metrics_port's
        OPENROUTER_MANAGEMENT_KEY=sandbox.management_key,
        OPENROUTER_BASE_URL=str(sandbox.base_url),
    )
    return env


@pytest.fixture
async def pool(database_url: str, sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[tuple[Pool, int]]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "serve",
        "--workers",
        "2",
        env=pool_env(database_url, sandbox, tmp_path, port),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    running = Pool(proc)
    drainer = asyncio.ensure_future(running.drain())
    try:
        yield running, port
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for pid in running.workers:  # never leave a worker behind, whatever happened
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await asyncio.wait_for(drainer, 30)


async def tokens(database_url: str) -> tuple[str, str]:
    db = await Database.connect(database_url, Settings(db_pool_min=1, db_pool_max=2))
    try:
        authority = TokenAuthority(db, system_clock)
        admin = await authority.create("workers-admin", "admin", "test")
        agent = await authority.create("workers-agent", "agent", "test")
        return admin.token, agent.token
    finally:
        await db.close()


async def test_two_workers_share_one_port_and_serve_every_channel(
    pool: tuple[Pool, int], database_url: str
) -> None:
    running, port = pool
    workers = await running.wait_workers(2)
    pids = set(workers)
    assert len(pids) == 2 and set(workers.values()) == {port}, running.log()
    assert all(parent_of(pid) == running.proc.pid for pid in pids), "workers are the supervisor's children"
    # SO_REUSEPORT: one listening socket per worker, both bound to the same port.
    listening = socket_owners(server_sockets(port, TCP_LISTEN), pids)
    assert all(len(held) == 1 for held in listening.values()), listening

    admin_token, agent_token = await tokens(database_url)
    admin_md = (("authorization", f"Bearer {admin_token}"),)
    agent_md = (("authorization", f"Bearer {agent_token}"),)
    target = f"127.0.0.1:{port}"
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(CHANNELS)]
    try:
        admin = pb_grpc.KeyBrokerAdminStub(channels[0])
        request = pb.ProvisionKeyRequest(user_id="pool-user", tier="standard", request_id="prov-pool")
        await admin.ProvisionKey(request, metadata=admin_md, timeout=30)
        agents = [pb_grpc.KeyBrokerStub(channel) for channel in channels]

        async def calls(index: int) -> None:
            agent = agents[index % CHANNELS]
            key = await agent.GetKey(pb.GetKeyRequest(user_id="pool-user"), metadata=agent_md, timeout=20)
            assert key.api_key.startswith("sk-or-v1-")
            usage = pb.RecordUsageRequest(
                user_id="pool-user", request_id=f"pool-{index}", model="m", cost_usd="0.01"
            )
            await agent.RecordUsage(usage, metadata=agent_md, timeout=20)

        await asyncio.gather(*(calls(i) for i in range(8 * CHANNELS)))
        # The kernel handed the connections to both workers: each holds accepted sockets.
        accepted = socket_owners(server_sockets(port, TCP_ESTABLISHED), pids)
        assert all(accepted.values()), accepted
        assert sum(len(held) for held in accepted.values()) >= CHANNELS, accepted
        # One database behind both: every call counted once, whichever worker took it.
        check = await agents[-1].CheckLimit(
            pb.CheckLimitRequest(user_id="pool-user"), metadata=agent_md, timeout=20
        )
        assert Decimal(check.spent_usd) == Decimal("0.01") * 8 * CHANNELS
    finally:
        for channel in channels:
            await channel.close()

    running.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(running.proc.wait(), 30) == 0, running.log()
    for pid in pids:
        assert not alive(pid), f"worker {pid} outlived the supervisor"
    assert "stopping 2 workers" in running.log()


async def test_a_dead_worker_stops_the_others_and_the_pool_fails(pool: tuple[Pool, int]) -> None:
    running, _ = pool
    workers = await running.wait_workers(2)
    victim, survivor = sorted(workers)
    os.kill(victim, signal.SIGKILL)
    assert await asyncio.wait_for(running.proc.wait(), 30) == 1, running.log()
    assert not alive(survivor), "the other worker was stopped"
    assert f"worker pid {victim} exited" in running.log()


async def test_workers_refuse_a_port_in_use(database_url: str, sandbox: Sandbox, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = int(busy.getsockname()[1])
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "serve",
            "--workers",
            "2",
            env=pool_env(database_url, sandbox, tmp_path, port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in stderr.decode()


def test_each_worker_gets_its_metrics_port() -> None:
    assert [metrics_listen("127.0.0.1:9464", i) for i in range(3)] == [
        "127.0.0.1:9464",
        "127.0.0.1:9465",
        "127.0.0.1:9466",
    ]
    assert metrics_listen("0.0.0.0:0", 1) == "0.0.0.0:0", "port 0: each worker picks a free one"
    assert metrics_listen(None, 1) == "off"
