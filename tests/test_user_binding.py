"""End-user binding (issue 5 item 9): with a JWT secret or JWKS configured, GetKey and CheckLimit
need `x-user-jwt` whose verified `sub` is the request's user_id. Tokens are signed here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from keybroker.v1 import keybroker_pb2 as pb

from broker.config import ConfigError, Settings, load_settings
from broker.errors import UserBindingFailed
from broker.sandbox import Sandbox
from broker.user_binding import UserBinding, load_jwks
from tests.conftest import Broker
from tests.helpers import assert_rpc_error, fresh_database, running_broker

SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"
AUDIENCE = "authenticated"
USER, OTHER = "alice", "bob"
RSA_KID, EC_KID = "rsa-1", "ec-1"


@dataclass(frozen=True)
class Keys:
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    jwks_file: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(
        json.dumps({"keys": [public_jwk(rsa_key, RSA_KID, "RS256"), public_jwk(ec_key, EC_KID, "ES256")]})
    )
    return Keys(rsa_key, ec_key, path)


def public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str, alg: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        text = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())
    else:
        text = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())
    jwk: dict[str, Any] = json.loads(text)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def claims(
    sub: str = USER, *, exp_in: float = 300, aud: str | None = AUDIENCE, **extra: Any
) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(exp_in), "role": "authenticated"}
    if aud is not None:
        body["aud"] = aud
    return {**body, **extra}


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def rs256(payload: dict[str, Any], key: rsa.RSAPrivateKey, kid: str | None = RSA_KID) -> str:
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid} if kid else None)


def es256(payload: dict[str, Any], key: ec.EllipticCurvePrivateKey, kid: str | None = EC_KID) -> str:
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": kid} if kid else None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], sign: bytes | None = None) -> str:
    """A JWT assembled by hand (for what PyJWT refuses to make): HS256 over `sign`, or unsigned."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if sign is None:
        return f"{signing_input}."
    return f"{signing_input}.{b64(hmac.new(sign, signing_input.encode(), hashlib.sha256).digest())}"


@pytest.fixture(scope="module")
async def bound(
    pg_admin_url: str, template_url: str, tmp_path_factory: pytest.TempPathFactory, keys: Keys
) -> AsyncIterator[Broker]:
    """A broker with binding on: the HS256 secret and a JWKS (RS256 + ES256), audience required."""
    sandbox = Sandbox("sandbox-management-" + secrets.token_hex(8))
    await sandbox.start("127.0.0.1", 0)
    try:
        async with (
            fresh_database(pg_admin_url) as url,
            running_broker(
                url,
                sandbox,
                tmp_path_factory.mktemp("binding"),
                background_interval=timedelta(hours=1),
                user_jwt_secret=SECRET,
                user_jwks_file=keys.jwks_file,
                user_jwt_audience=AUDIENCE,
            ) as broker,
        ):
            await broker.provision(USER)
            await broker.provision(OTHER)
            yield broker
    finally:
        await sandbox.stop()


def with_jwt(broker: Broker, token: str | None) -> tuple[tuple[str, str], ...]:
    return broker.as_agent() + ((("x-user-jwt", token),) if token is not None else ())


async def get_key(broker: Broker, token: str | None, user: str = USER) -> pb.GetKeyResponse:
    return await broker.agent.GetKey(
        pb.GetKeyRequest(user_id=user), metadata=with_jwt(broker, token), timeout=10
    )


async def check_limit(broker: Broker, token: str | None, user: str = USER) -> pb.CheckLimitResponse:
    return await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id=user), metadata=with_jwt(broker, token), timeout=10
    )


async def assert_denied(broker: Broker, token: str | None, user: str = USER, message: str = "") -> None:
    """Both bound RPCs answer PERMISSION_DENIED USER_BINDING_FAILED, never echoing the token."""
    for call in (get_key, check_limit):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(broker, token, user)
        assert_rpc_error(caught.value, grpc.StatusCode.PERMISSION_DENIED, "USER_BINDING_FAILED")
        details = caught.value.details() or ""
        assert message in details, details
        if token:
            assert token not in details and token not in str(caught.value.trailing_metadata())
            header = token.split(".")[0]
            assert len(header) < 8 or header not in details  # not even the header


# -- The right user's token ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["HS256", "RS256", "ES256", "RS256 without kid", "Bearer prefix"])
async def test_a_valid_token_of_the_user_gets_the_key_and_the_limit(
    bound: Broker, keys: Keys, kind: str
) -> None:
    token = {
        "HS256": lambda: hs256(claims()),
        "RS256": lambda: rs256(claims(), keys.rsa),
        "ES256": lambda: es256(claims(), keys.ec),
        "RS256 without kid": lambda: rs256(claims(), keys.rsa, kid=None),
        "Bearer prefix": lambda: "Bearer " + hs256(claims()),
    }[kind]()
    reply = await get_key(bound, token)
    assert reply.api_key.startswith("sk-or-v1-")
    assert (await check_limit(bound, token)).allowed


async def test_expiry_allows_the_configured_leeway(bound: Broker, keys: Keys) -> None:
    await get_key(bound, hs256(claims(exp_in=-5)))  # 5 s past exp, within the default 30 s
    await assert_denied(bound, hs256(claims(exp_in=-120)), message="expired")


# -- Everything else is PERMISSION_DENIED USER_BINDING_FAILED -------------------------------------


async def test_a_token_of_another_user_is_denied(bound: Broker, keys: Keys) -> None:
    await assert_denied(bound, hs256(claims(sub=OTHER)), message="not for this user_id")
    await assert_denied(bound, rs256(claims(sub=OTHER), keys.rsa), message="not for this user_id")
    await get_key(bound, hs256(claims(sub=OTHER)), user=OTHER)  # ... which is fine for bob himself


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("expired HS256", "expired"),
        ("expired ES256", "expired"),
        ("wrong audience", "audience does not match"),
        ("no audience", "lacks a required claim"),
        ("no exp", "lacks a required claim"),
        ("no sub", "lacks a required claim"),
        ("HS256 with another secret", "signature does not verify"),
        ("RS256 with another key under a known kid", "signature does not verify"),
        ("RS256 with another key and no kid", "signature does not verify"),
        ("RS256 with an unknown kid", "signing key this broker does not know"),
        ("alg none", "algorithm"),
        ("alg none, no signature part", "malformed"),
        ("HS256 keyed with the RSA public key", "signature does not verify"),
        ("RS512", "algorithm"),
        ("not a JWT", "malformed"),
        ("three dots of garbage", "malformed"),
        ("a tampered payload", "signature does not verify"),
    ],
)
async def test_invalid_tokens_are_denied(bound: Broker, keys: Keys, case: str, message: str) -> None:
    other_rsa = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048) if "another key" in case else None
    )
    public_pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    no_exp = {k: v for k, v in claims().items() if k != "exp"}
    no_sub = {k: v for k, v in claims().items() if k != "sub"}
    valid = hs256(claims())
    header, _payload, signature = valid.split(".")
    tampered = f"{header}.{b64(json.dumps(claims(sub=USER, role='service_role')).encode())}.{signature}"
    token = {
        "expired HS256": lambda: hs256(claims(exp_in=-3600)),
        "expired ES256": lambda: es256(claims(exp_in=-3600), keys.ec),
        "wrong audience": lambda: hs256(claims(aud="anon")),
        "no audience": lambda: hs256(claims(aud=None)),
        "no exp": lambda: hs256(no_exp),
        "no sub": lambda: hs256(no_sub),
        "HS256 with another secret": lambda: hs256(claims(), "x" * 40),
        "RS256 with another key under a known kid": lambda: rs256(claims(), other_rsa),  # type: ignore[arg-type]
        "RS256 with another key and no kid": lambda: rs256(claims(), other_rsa, kid=None),  # type: ignore[arg-type]
        "RS256 with an unknown kid": lambda: rs256(claims(), keys.rsa, kid="rotated-away"),
        "alg none": lambda: handmade({"alg": "none", "typ": "JWT"}, claims()),
        "alg none, no signature part": lambda: handmade({"alg": "none"}, claims()).rstrip("."),
        "HS256 keyed with the RSA public key": lambda: handmade(
            {"alg": "HS256", "typ": "JWT", "kid": RSA_KID}, claims(), sign=public_pem
        ),
        "RS512": lambda: jwt.encode(claims(), keys.rsa, algorithm="RS512", headers={"kid": RSA_KID}),
        "not a JWT": lambda: "hello",
        "three dots of garbage": lambda: "a.b.c",
        "a tampered payload": lambda: tampered,
    }[case]()
    await assert_denied(bound, token, message=message)


async def test_missing_or_repeated_metadata_is_denied(bound: Broker) -> None:
    await assert_denied(bound, None, message="missing x-user-jwt")
    await assert_denied(bound, "", message="missing x-user-jwt")
    token = hs256(claims())
    twice = (*with_jwt(bound, token), ("x-user-jwt", token))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bound.agent.GetKey(pb.GetKeyRequest(user_id=USER), metadata=twice, timeout=10)
    assert_rpc_error(caught.value, grpc.StatusCode.PERMISSION_DENIED, "USER_BINDING_FAILED")


async def test_the_caller_token_is_still_checked_first(bound: Broker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bound.agent.GetKey(
            pb.GetKeyRequest(user_id=USER), metadata=(("x-user-jwt", hs256(claims())),), timeout=10
        )
    assert_rpc_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


# -- Other RPCs are not bound; without the settings nothing changes ---------------------------------


async def test_other_rpcs_need_no_user_jwt(bound: Broker) -> None:
    agent = bound.as_agent()
    recorded = await bound.agent.RecordUsage(
        pb.RecordUsageRequest(user_id=USER, request_id="gen-unbound", cost_usd="0.01"),
        metadata=agent,
        timeout=10,
    )
    assert not recorded.duplicate
    released = await bound.agent.ReleaseReservation(
        pb.ReleaseReservationRequest(user_id=USER, reservation_id="00000000-0000-0000-0000-000000000000"),
        metadata=agent,
        timeout=10,
    )
    assert not released.released
    info = await bound.admin.GetKeyInfo(
        pb.GetKeyInfoRequest(user_id=USER), metadata=bound.as_admin(), timeout=10
    )
    assert info.key.user_id == USER
    listed = await bound.admin.ListKeys(pb.ListKeysRequest(), metadata=bound.as_admin(), timeout=10)
    assert {k.user_id for k in listed.keys} >= {USER, OTHER}


async def test_an_admin_token_is_bound_too(bound: Broker) -> None:
    """The binding is about the end user, not the caller's scope: admins need the JWT as well."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bound.agent.GetKey(pb.GetKeyRequest(user_id=USER), metadata=bound.as_admin(), timeout=10)
    assert_rpc_error(caught.value, grpc.StatusCode.PERMISSION_DENIED, "USER_BINDING_FAILED")


async def test_without_the_settings_no_jwt_is_needed(broker: Broker) -> None:
    assert not broker.runtime.settings.user_binding
    await broker.provision("free-user")
    reply = await broker.agent.GetKey(
        pb.GetKeyRequest(user_id="free-user"), metadata=broker.as_agent(), timeout=10
    )
    assert reply.api_key
    ignored = (*broker.as_agent(), ("x-user-jwt", "not even a jwt"))  # sent anyway: ignored
    checked = await broker.agent.CheckLimit(
        pb.CheckLimitRequest(user_id="free-user"), metadata=ignored, timeout=10
    )
    assert checked.allowed


# -- The verifier and its configuration, without a server ---------------------------------------------


def test_without_an_audience_setting_the_aud_claim_is_not_checked() -> None:
    binding = UserBinding(secret=SECRET)
    binding.verify(hs256(claims(aud="anything")), USER)
    binding.verify(hs256(claims(aud=None)), USER)
    with pytest.raises(UserBindingFailed, match="not for this user_id"):
        binding.verify(hs256(claims()), OTHER)


def test_an_oversized_token_is_refused_before_parsing() -> None:
    # (Over gRPC, metadata this large is refused by gRPC itself: RESOURCE_EXHAUSTED.)
    with pytest.raises(UserBindingFailed, match="malformed"):
        UserBinding(secret=SECRET).verify(hs256(claims(pad="A" * 9000)), USER)


def test_a_leeway_of_zero_is_strict() -> None:
    binding = UserBinding(secret=SECRET, leeway=timedelta(0))
    with pytest.raises(UserBindingFailed, match="expired"):
        binding.verify(hs256(claims(exp_in=-2)), USER)


def test_a_jwks_only_binding_refuses_hs256(keys: Keys) -> None:
    binding = UserBinding(jwks=load_jwks(keys.jwks_file))
    binding.verify(rs256(claims(), keys.rsa), USER)
    with pytest.raises(UserBindingFailed, match="algorithm"):
        binding.verify(hs256(claims()), USER)


def test_settings_come_from_the_environment(keys: Keys) -> None:
    settings = load_settings(
        {
            "KEYBROKER_USER_JWT_SECRET": SECRET,
            "KEYBROKER_USER_JWKS_FILE": str(keys.jwks_file),
            "KEYBROKER_USER_JWT_AUDIENCE": AUDIENCE,
            "KEYBROKER_USER_JWT_LEEWAY": "10s",
        }
    )
    assert settings.user_binding and settings.user_jwt_secret == SECRET
    assert settings.user_jwks_file == keys.jwks_file and settings.user_jwt_audience == AUDIENCE
    assert settings.user_jwt_leeway == timedelta(seconds=10)
    assert SECRET not in repr(settings)
    defaults = load_settings({})
    assert not defaults.user_binding and defaults.user_jwt_leeway == timedelta(seconds=30)
    assert UserBinding.from_settings(defaults) is None


def test_a_short_secret_is_a_config_error_that_does_not_show_it() -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes") as caught:
        load_settings({"KEYBROKER_USER_JWT_SECRET": "short-secret"})
    assert "short-secret" not in str(caught.value)


def test_bad_jwks_files_are_config_errors(tmp_path: Path, keys: Keys) -> None:
    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys.rsa))
    cases: dict[str, object] = {
        "is not JSON": "{not json",
        "is not a JWKS": {"kty": "RSA"},
        "holds a private or symmetric key": {"keys": [private]},
        "holds a private or symmetric key ": {"keys": [{"kty": "oct", "k": b64(b"x" * 32)}]},
        "has no RS256 or ES256 public key": {"keys": [{"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"}]},
    }
    for index, (message, content) in enumerate(cases.items()):
        path = tmp_path / f"jwks-{index}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ConfigError, match=message.strip()) as caught:
            UserBinding.from_settings(Settings(user_jwks_file=path))
        assert private["d"] not in str(caught.value)
    with pytest.raises(ConfigError, match="KEYBROKER_USER_JWKS_FILE: cannot read"):
        UserBinding.from_settings(Settings(user_jwks_file=tmp_path / "absent.json"))


async def test_a_bad_jwks_file_fails_the_start(database_url: str, sandbox: Sandbox, tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    with pytest.raises(ConfigError, match="KEYBROKER_USER_JWKS_FILE"):
        async with running_broker(database_url, sandbox, tmp_path, user_jwks_file=missing):
            pass
