"""Structured logs (issue 4.5): one JSON object per line with the RPC, status, duration, user id,
request id and caller token name; a human format for the terminal; never a secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import grpc
import pytest
from keybroker.v1 import keybroker_pb2 as pb

from broker.logs import JsonFormatter, ScrubFilter
from tests.conftest import Broker


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The broker's RPC log, rendered as `KEYBROKER_LOG_FORMAT=json KEYBROKER_LOG_LEVEL=DEBUG` would."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ScrubFilter())
    handler.setFormatter(JsonFormatter())
    rpc_log = logging.getLogger("keybroker.rpc")
    previous = rpc_log.level
    rpc_log.addHandler(handler)
    rpc_log.setLevel(logging.DEBUG)
    yield stream
    rpc_log.removeHandler(handler)
    rpc_log.setLevel(previous)


async def test_each_rpc_is_one_json_line_with_its_fields_and_no_secret(
    broker: Broker, json_lines: io.StringIO
) -> None:
    await broker.provision("logged")
    key = await broker.agent.GetKey(pb.GetKeyRequest(user_id="logged"), metadata=broker.as_agent())
    await broker.agent.RecordUsage(
        pb.RecordUsageRequest(user_id="logged", request_id="gen-77", cost_usd="0.5"),
        metadata=broker.as_agent(),
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await broker.agent.RecordUsage(  # a client that puts a secret where it does not belong
            pb.RecordUsageRequest(user_id="logged", request_id=key.api_key, cost_usd="oops"),
            metadata=broker.as_agent(),
        )
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    by_rpc = {(entry["rpc"].rsplit("/", 1)[-1], entry.get("request_id")): entry for entry in lines}
    record = by_rpc[("RecordUsage", "gen-77")]
    assert record["status"] == "OK" and record["user_id"] == "logged" and record["caller"] == "test-agent"
    assert isinstance(record["duration_ms"], float) and record["duration_ms"] >= 0
    assert record["level"] == "INFO" and record["logger"] == "keybroker.rpc" and "time" in record
    provision = by_rpc[("ProvisionKey", "prov-logged")]
    assert provision["caller"] == "test-admin" and provision["status"] == "OK"
    refused = [e for e in lines if e["status"] == "INVALID_ARGUMENT"]
    assert len(refused) == 1 and refused[0]["request_id"] == "[redacted]"
    text = json_lines.getvalue()
    for secret in (
        key.api_key,
        broker.admin_token,
        broker.agent_token,
        str(broker.runtime.settings.master_key),
    ):
        assert secret not in text


def test_the_terminal_format_is_one_readable_line() -> None:
    from broker import logs

    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logs.configure("INFO", "text")
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        logging.getLogger("keybroker.test").warning("hello %s", "kbt_0123456789abcdef_" + "x" * 43)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    line = stream.getvalue().strip()
    assert line.endswith("WARNING keybroker.test: hello [redacted]") and "\n" not in line
