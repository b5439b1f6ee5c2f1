"""Transport security (issue 5 item 8): TLS and mutual TLS configured by settings, with certificates
made here by `cryptography`; plaintext only on loopback without a warning; the CLI over TLS."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from broker import crypto, tls
from broker.config import ConfigError, Settings, load_settings
from broker.sandbox import Sandbox
from tests.conftest import Broker, TestClock
from tests.helpers import running_broker

# -- A tiny PKI: a CA, a server certificate for 127.0.0.1/localhost, client certificates ----------


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path

    def credentials(self) -> tuple[bytes, bytes]:
        return self.key.read_bytes(), self.cert.read_bytes()


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Pair
    client: Pair  # signed by `ca`
    rogue_client: Pair  # signed by another CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(
    directory: Path,
    name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    usage: x509.ObjectIdentifier,
    san: list[x509.GeneralName] | None = None,
) -> Pair:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(name, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pair.key.chmod(0o600)
    return pair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _ca("keybroker test CA")
    other_ca = _ca("some other CA")
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    server_san: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    return Pki(
        ca=ca_path,
        server=_issue(directory, "server", ca, ExtendedKeyUsageOID.SERVER_AUTH, server_san),
        client=_issue(directory, "agent-1", ca, ExtendedKeyUsageOID.CLIENT_AUTH),
        rogue_client=_issue(directory, "rogue", other_ca, ExtendedKeyUsageOID.CLIENT_AUTH),
    )


def secure_channel(target: str, pki: Pki, client: Pair | None = None) -> grpc.aio.Channel:
    key, chain = client.credentials() if client else (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(), private_key=key, certificate_chain=chain
    )
    return grpc.aio.secure_channel(target, credentials)


@asynccontextmanager
async def tls_broker(
    database_url: str,
    sandbox: Sandbox,
    data_dir: Path,
    pki: Pki,
    *,
    mutual: bool = False,
    **overrides: object,
) -> AsyncIterator[Broker]:
    async with running_broker(
        database_url,
        sandbox,
        data_dir,
        TestClock(),
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_client_ca=pki.ca if mutual else None,
        **overrides,
    ) as broker:
        yield broker


async def provision_and_use(channel: grpc.aio.Channel, broker: Broker, user: str) -> None:
    """ProvisionKey (admin), then GetKey and CheckLimit (agent), all over `channel`."""
    admin, agent = pb_grpc.KeyBrokerAdminStub(channel), pb_grpc.KeyBrokerStub(channel)
    await admin.ProvisionKey(
        pb.ProvisionKeyRequest(user_id=user, tier="free", request_id=f"prov-{user}"),
        metadata=broker.as_admin(),
        timeout=10,
    )
    got = await agent.GetKey(pb.GetKeyRequest(user_id=user), metadata=broker.as_agent(), timeout=10)
    assert got.api_key.startswith("sk-or-v1-")
    checked = await agent.CheckLimit(
        pb.CheckLimitRequest(user_id=user), metadata=broker.as_agent(), timeout=10
    )
    assert checked.allowed


async def assert_refused(channel: grpc.aio.Channel, broker: Broker) -> None:
    """The connection cannot be made (handshake refused): UNAVAILABLE, nothing served."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pb_grpc.KeyBrokerStub(channel).CheckLimit(
            pb.CheckLimitRequest(user_id="nobody"), metadata=broker.as_agent(), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, (caught.value.code(), caught.value.details())


# -- TLS -----------------------------------------------------------------------------------------


async def test_tls_serves_a_secure_channel_and_refuses_plaintext(
    database_url: str, sandbox: Sandbox, tmp_path: Path, pki: Pki
) -> None:
    async with tls_broker(database_url, sandbox, tmp_path, pki) as broker:
        async with secure_channel(broker.target, pki) as channel:
            await provision_and_use(channel, broker, "tls-user")
        # A client certificate is not needed without a client CA (and harmless if sent).
        async with secure_channel(broker.target, pki, pki.rogue_client) as channel:
            await pb_grpc.KeyBrokerStub(channel).CheckLimit(
                pb.CheckLimitRequest(user_id="tls-user"), metadata=broker.as_agent(), timeout=10
            )
        # `broker.channel` is the helpers' plaintext channel: a TLS port refuses it.
        await assert_refused(broker.channel, broker)


async def test_tls_with_a_server_name_the_certificate_lacks_is_refused(
    database_url: str, sandbox: Sandbox, tmp_path: Path, pki: Pki
) -> None:
    async with tls_broker(database_url, sandbox, tmp_path, pki) as broker:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        options = (("grpc.ssl_target_name_override", "broker.example.com"),)
        async with grpc.aio.secure_channel(broker.target, credentials, options=options) as channel:
            await assert_refused(channel, broker)


# -- Mutual TLS ----------------------------------------------------------------------------------


async def test_mutual_tls_requires_a_client_certificate_from_the_configured_ca(
    database_url: str, sandbox: Sandbox, tmp_path: Path, pki: Pki
) -> None:
    async with tls_broker(database_url, sandbox, tmp_path, pki, mutual=True) as broker:
        async with secure_channel(broker.target, pki) as channel:
            await assert_refused(channel, broker)  # no client certificate
        async with secure_channel(broker.target, pki, pki.rogue_client) as channel:
            await assert_refused(channel, broker)  # signed by another CA
        await assert_refused(broker.channel, broker)  # plaintext
        async with secure_channel(broker.target, pki, pki.client) as channel:
            await provision_and_use(channel, broker, "mtls-user")


# -- Configuration errors ------------------------------------------------------------------------


async def test_half_configured_tls_is_a_config_error_at_start(
    database_url: str, sandbox: Sandbox, tmp_path: Path, pki: Pki
) -> None:
    with pytest.raises(ConfigError, match="KEYBROKER_TLS_CERT and KEYBROKER_TLS_KEY go together"):
        async with running_broker(database_url, sandbox, tmp_path, tls_cert=pki.server.cert):
            pass
    with pytest.raises(ConfigError, match="KEYBROKER_TLS_CLIENT_CA needs"):
        async with running_broker(database_url, sandbox, tmp_path, tls_client_ca=pki.ca):
            pass
    # A file that cannot be read fails the start before anything listens.
    missing = tmp_path / "missing.key"
    with pytest.raises(ConfigError, match=f"KEYBROKER_TLS_KEY: cannot read {missing}"):
        async with running_broker(database_url, sandbox, tmp_path, tls_cert=pki.server.cert, tls_key=missing):
            pass


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KEYBROKER_TLS_CERT": "c.pem"}, "KEYBROKER_TLS_CERT and KEYBROKER_TLS_KEY go together"),
        ({"KEYBROKER_TLS_KEY": "k.pem"}, "KEYBROKER_TLS_CERT and KEYBROKER_TLS_KEY go together"),
        ({"KEYBROKER_TLS_CLIENT_CA": "ca.pem"}, "KEYBROKER_TLS_CLIENT_CA needs KEYBROKER_TLS_CERT"),
        ({"KEYBROKER_TLS_CLIENT_KEY": "k.pem"}, "KEYBROKER_TLS_CLIENT_CERT and KEYBROKER_TLS_CLIENT_KEY"),
        (
            {"KEYBROKER_TLS_CLIENT_CERT": "c.pem", "KEYBROKER_TLS_CLIENT_KEY": "k.pem"},
            "KEYBROKER_TLS_CLIENT_CERT needs KEYBROKER_TLS_CA",
        ),
    ],
)
def test_half_configured_tls_in_the_environment(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_tls_settings_are_read_from_the_environment() -> None:
    settings = load_settings(
        {
            "KEYBROKER_TLS_CERT": "/etc/kb/server.crt",
            "KEYBROKER_TLS_KEY": "/etc/kb/server.key",
            "KEYBROKER_TLS_CLIENT_CA": "/etc/kb/clients.crt",
            "KEYBROKER_TLS_CA": "/etc/kb/ca.crt",
            "KEYBROKER_TLS_CLIENT_CERT": "/etc/kb/cli.crt",
            "KEYBROKER_TLS_CLIENT_KEY": "/etc/kb/cli.key",
        }
    )
    assert settings.tls_cert == Path("/etc/kb/server.crt") and settings.tls_key == Path("/etc/kb/server.key")
    assert settings.tls_client_ca == Path("/etc/kb/clients.crt") and settings.tls_ca == Path("/etc/kb/ca.crt")
    assert settings.tls_client_cert == Path("/etc/kb/cli.crt")
    assert settings.tls_client_key == Path("/etc/kb/cli.key")
    assert load_settings({}).tls_cert is None


def test_wrong_files_are_config_errors_that_never_show_key_material(pki: Pki, tmp_path: Path) -> None:
    key_text = pki.server.key.read_text()
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    cases = {
        "holds no PEM private key": Settings(tls_cert=pki.server.cert, tls_key=pki.server.cert),
        "holds no PEM certificate": Settings(tls_cert=pki.server.key, tls_key=pki.server.key),
        "is not the private key of the certificate": Settings(
            tls_cert=pki.server.cert, tls_key=pki.client.key
        ),
        "is encrypted": Settings(tls_cert=pki.server.cert, tls_key=encrypted),
        "KEYBROKER_TLS_CLIENT_CA: .* holds no PEM certificate": Settings(
            tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.server.key
        ),
    }
    for message, settings in cases.items():
        with pytest.raises(ConfigError, match=message) as caught:
            tls.server_credentials(settings)
        # Not in the message, nor anywhere in the traceback a crash report would show.
        text = "".join(traceback.format_exception(caught.value))
        assert "BEGIN" not in text and key_text not in text, text
    client_side = Settings(tls_ca=pki.ca, tls_client_cert=pki.client.cert, tls_client_key=pki.server.key)
    with pytest.raises(ConfigError, match=r"KEYBROKER_TLS_CLIENT_KEY: .* is not the private key"):
        tls.channel_credentials(client_side)
    assert tls.server_credentials(Settings()) is None and tls.channel_credentials(Settings()) is None


# -- Plaintext only on loopback --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.3.4.5:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/run/keybroker.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.0.0.7:50051", False),
        ("broker.internal:50051", False),
    ],
)
def test_is_loopback(listen: str, loopback: bool) -> None:
    assert tls.is_loopback(listen) is loopback


def _plaintext_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "WITHOUT TLS" in r.getMessage()]


async def test_plaintext_on_every_interface_logs_a_warning_at_start(
    database_url: str, sandbox: Sandbox, tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    same_key = crypto.generate_master_key()  # three brokers, one database
    with caplog.at_level(logging.WARNING, logger="keybroker"):
        async with running_broker(
            database_url, sandbox, tmp_path, listen="0.0.0.0:0", master_key=same_key
        ) as broker:
            warnings = _plaintext_warnings(caplog)
            assert len(warnings) == 1 and "0.0.0.0:0" in warnings[0], warnings
            assert [r.levelno for r in caplog.records if "WITHOUT TLS" in r.getMessage()] == [logging.WARNING]
            await broker.provision("plain-user")  # it serves all the same (reached over loopback)
        caplog.clear()
        async with running_broker(database_url, sandbox, tmp_path / "loopback", master_key=same_key):
            assert _plaintext_warnings(caplog) == []  # the default, 127.0.0.1: no warning
        async with tls_broker(
            database_url, sandbox, tmp_path / "tls", pki, listen="0.0.0.0:0", master_key=same_key
        ) as broker:
            assert _plaintext_warnings(caplog) == []  # every interface, but with TLS
            async with secure_channel(broker.target, pki) as channel:
                await provision_and_use(channel, broker, "tls-any-user")


# -- The command line over TLS ---------------------------------------------------------------------


async def run_cli(*argv: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "broker", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
        check=False,
    )


async def test_cli_uses_tls_and_a_client_certificate_from_the_environment(
    database_url: str, sandbox: Sandbox, tmp_path: Path, pki: Pki
) -> None:
    async with tls_broker(database_url, sandbox, tmp_path, pki, mutual=True) as broker:
        async with secure_channel(broker.target, pki, pki.client) as channel:
            await provision_and_use(channel, broker, "cli-tls-user")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OPENROUTER_"))}
        env.update(
            KEYBROKER_LISTEN=broker.target,
            KEYBROKER_TOKEN=broker.admin_token,
            KEYBROKER_DATA_DIR=str(tmp_path),
            KEYBROKER_TLS_CA=str(pki.ca),
            KEYBROKER_TLS_CLIENT_CERT=str(pki.client.cert),
            KEYBROKER_TLS_CLIENT_KEY=str(pki.client.key),
        )
        status = await run_cli("key", "status", "cli-tls-user", "--json", env=env, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert '"user_id": "cli-tls-user"' in status.stdout

        without_cert = {k: v for k, v in env.items() if not k.startswith("KEYBROKER_TLS_CLIENT_")}
        refused = await run_cli("key", "status", "cli-tls-user", env=without_cert, cwd=tmp_path)
        assert refused.returncode == 1 and "keybroker: error:" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr

        half = {**env, "KEYBROKER_TLS_CLIENT_KEY": ""}
        misconfigured = await run_cli("key", "status", "cli-tls-user", env=half, cwd=tmp_path)
        assert misconfigured.returncode == 1
        assert "KEYBROKER_TLS_CLIENT_CERT and KEYBROKER_TLS_CLIENT_KEY go together" in misconfigured.stderr
