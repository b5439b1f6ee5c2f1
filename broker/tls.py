"""Transport security: TLS and mutual TLS credentials from the PEM files named in Settings.

Every file is read and parsed here, once, so a wrong path or a wrong file is a ConfigError at start
that names the variable and the path (never the file's content), not a failed handshake later.
"""

from __future__ import annotations

import ipaddress
import logging
import stat
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from broker.config import ConfigError, Settings

log = logging.getLogger("keybroker.tls")

_PUBLIC_DER = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the server, or None when TLS is not configured (plaintext)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    chain, certificates = _certificates(settings.tls_cert, "KEYBROKER_TLS_CERT")
    key_pem = _private_key(settings.tls_key, "KEYBROKER_TLS_KEY", certificates[0])
    if certificates[0].not_valid_after_utc < datetime.now(UTC):
        log.warning("the server certificate in KEYBROKER_TLS_CERT (%s) has expired", settings.tls_cert)
    client_ca = None
    if settings.tls_client_ca is not None:
        client_ca, _ = _certificates(settings.tls_client_ca, "KEYBROKER_TLS_CLIENT_CA")
    log.info(
        "TLS on%s", "; client certificates signed by KEYBROKER_TLS_CLIENT_CA required" if client_ca else ""
    )
    return grpc.ssl_server_credentials(
        [(key_pem, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """TLS credentials for the command line's channel (KEYBROKER_TLS_CA, optionally a client
    certificate for mutual TLS), or None for plaintext."""
    if settings.tls_ca is None:
        return None
    ca, _ = _certificates(settings.tls_ca, "KEYBROKER_TLS_CA")
    chain = key_pem = None
    if settings.tls_client_cert is not None and settings.tls_client_key is not None:
        chain, certificates = _certificates(settings.tls_client_cert, "KEYBROKER_TLS_CLIENT_CERT")
        key_pem = _private_key(settings.tls_client_key, "KEYBROKER_TLS_CLIENT_KEY", certificates[0])
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key_pem, certificate_chain=chain)


def is_loopback(listen: str) -> bool:
    """Whether a listen address (HOST:PORT, [V6]:PORT, unix:PATH) is reachable only from this host."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" (every interface)
        return False


def _read(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def _certificates(path: Path, variable: str) -> tuple[bytes, list[x509.Certificate]]:
    """The file's bytes and the PEM certificates in it (at least one)."""
    data = _read(path, variable)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"{variable}: {path} holds no PEM certificate") from None
    return data, certificates


def _private_key(path: Path, variable: str, certificate: x509.Certificate) -> bytes:
    """The PEM private key in `path`, checked to be unencrypted and to match `certificate`. Errors
    are chained from None: nothing of the key reaches a message or a traceback."""
    data = _read(path, variable)
    try:
        key: PrivateKeyTypes = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{variable}: {path} is encrypted; give an unencrypted PEM key and protect the file (mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{variable}: {path} holds no PEM private key") from None
    if key.public_key().public_bytes(*_PUBLIC_DER) != certificate.public_key().public_bytes(*_PUBLIC_DER):
        raise ConfigError(f"{variable}: {path} is not the private key of the certificate beside it")
    try:
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s: %s is readable by other users; chmod 600 it", variable, path)
    except OSError:
        pass
    return data
