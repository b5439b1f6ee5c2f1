"""The Prometheus endpoint after real traffic: every figure the operators rely on moved."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from keybroker.v1 import keybroker_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from broker.sandbox import Sandbox
from tests.helpers import eventually, running_broker


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                total += found.value
    return total


async def test_metrics_move_with_traffic_and_hold_no_secret(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    settings = {"metrics_listen": "127.0.0.1:0", "background_interval": timedelta(milliseconds=50)}
    async with running_broker(database_url, sandbox, tmp_path, **settings) as broker:
        port = broker.runtime.metrics.port
        assert port > 0
        url = f"http://127.0.0.1:{port}/metrics"
        async with httpx.AsyncClient(timeout=5) as http:
            before = (await http.get(url)).text
            await broker.provision("metered", limit="10")
            key = await broker.agent.GetKey(pb.GetKeyRequest(user_id="metered"), metadata=broker.as_agent())
            await broker.agent.CheckLimit(
                pb.CheckLimitRequest(user_id="metered", estimated_cost_usd="0.25"), metadata=broker.as_agent()
            )
            await asyncio.gather(
                *(
                    broker.agent.RecordUsage(
                        pb.RecordUsageRequest(
                            user_id="metered", request_id=f"g-{i}", cost_usd="0.1234567", model="m/one"
                        ),
                        metadata=broker.as_agent(),
                    )
                    for i in range(4)
                )
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await broker.agent.GetKey(pb.GetKeyRequest(user_id="nobody"), metadata=broker.as_agent())

            await broker.agent.RecordUsage(  # crosses 80 % and 100 % of the $10 limit: two alerts
                pb.RecordUsageRequest(user_id="metered", request_id="big", cost_usd="10", model="m/two"),
                metadata=broker.as_agent(),
            )

            async def gauges_set() -> bool:
                text = (await http.get(url)).text
                return (
                    sample(text, "keybroker_open_reservations") == 1.0
                    and sample(text, "keybroker_alerts_pending") == 2.0
                )

            await eventually(gauges_set, timeout=10)
            after = (await http.get(url)).text

    get_key = "/keybroker.v1.KeyBroker/GetKey"
    assert sample(before, "keybroker_rpc_requests_total", method=get_key) == 0
    assert sample(after, "keybroker_rpc_requests_total", method=get_key, code="OK") == 1
    assert sample(after, "keybroker_rpc_requests_total", method=get_key, code="NOT_FOUND") == 1
    assert (
        sample(after, "keybroker_rpc_duration_seconds_count", method="/keybroker.v1.KeyBroker/RecordUsage")
        == 5
    )
    assert sample(after, "keybroker_spend_micro_usd_total", model="m/one") == 4 * 123457, "rounded half-even"
    assert (
        sample(after, "keybroker_provider_request_duration_seconds_count", endpoint="keys", method="POST")
        == 1
    )
    assert sample(after, "keybroker_background_runs_total", task="expire-reservations") > 0
    assert sample(after, "keybroker_db_pool_idle") + sample(after, "keybroker_db_pool_in_use") >= 1
    assert sample(after, "keybroker_alerts_pending") == 2, "no webhook configured: both wait"
    for secret in (
        key.api_key,
        broker.admin_token,
        broker.agent_token,
        str(broker.runtime.settings.master_key),
    ):
        assert secret not in after
