"""End-user binding (optional per deployment): GetKey and CheckLimit only for the user whose JWT
the agent forwards.

With KEYBROKER_USER_JWT_SECRET (HS256, the shared secret Supabase issues) and/or
KEYBROKER_USER_JWKS_FILE (RS256 / ES256 public keys), both RPCs require metadata `x-user-jwt`:
a JWT whose signature verifies, which has not expired (`exp`, with a small leeway), whose `aud`
matches KEYBROKER_USER_JWT_AUDIENCE when that is set, and whose `sub` is the request's `user_id`.
Anything else is PERMISSION_DENIED `USER_BINDING_FAILED`. So an agent holding a broker token can
fetch the key only of a user whose request it is serving. The algorithm is chosen by which key the
deployment configured, never by the token: `alg: none` and HS256 tokens "signed" with a public key
are refused. Verification is PyJWT's; this module picks the key and maps failures to short
messages that never contain the token.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
from keybroker.v1 import keybroker_pb2 as pb

from broker.config import ConfigError, Settings
from broker.errors import UserBindingFailed

METADATA_KEY = "x-user-jwt"
# Real JWTs are well under 2 KiB; longer metadata is refused before any parsing.
MAX_TOKEN_CHARS = 8192
JWKS_ALGORITHMS = ("RS256", "ES256")
_SERVICE = pb.DESCRIPTOR.services_by_name["KeyBroker"].full_name
BOUND_METHODS = frozenset({f"/{_SERVICE}/GetKey", f"/{_SERVICE}/CheckLimit"})


@dataclass(frozen=True)
class _Key:
    algorithm: str
    key: jwt.PyJWK | bytes
    key_id: str | None


class UserBinding:
    """Verifies `x-user-jwt` tokens against the configured keys."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        jwks: Sequence[jwt.PyJWK] = (),
        audience: str | None = None,
        leeway: timedelta = timedelta(seconds=30),
    ) -> None:
        keys = [_Key(k.algorithm_name, k, k.key_id) for k in jwks]
        if secret is not None:
            keys.append(_Key("HS256", secret.encode(), None))
        if not keys:
            raise ValueError("user binding needs a secret or a JWKS key")
        self._keys = tuple(keys)
        self.algorithms = frozenset(k.algorithm for k in keys)
        self.audience = audience
        self.leeway = leeway

    @classmethod
    def from_settings(cls, settings: Settings) -> UserBinding | None:
        """The binding the settings ask for, or None when binding is off. Reads the JWKS file."""
        if not settings.user_binding:
            return None
        jwks = load_jwks(settings.user_jwks_file) if settings.user_jwks_file is not None else []
        return cls(
            secret=settings.user_jwt_secret,
            jwks=jwks,
            audience=settings.user_jwt_audience,
            leeway=settings.user_jwt_leeway,
        )

    def verify(self, token: str | None, user_id: str) -> None:
        """Return if `token` is a valid JWT of `user_id`; raise UserBindingFailed otherwise."""
        if not token:
            raise UserBindingFailed(f"missing {METADATA_KEY} metadata: this broker binds calls to end users")
        if len(token) > MAX_TOKEN_CHARS:
            raise UserBindingFailed(f"{METADATA_KEY} is malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise UserBindingFailed(f"{METADATA_KEY} is malformed") from None
        algorithm, key_id = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            raise UserBindingFailed(f"{METADATA_KEY} uses an algorithm this broker does not accept")
        candidates = [
            k
            for k in self._keys
            if k.algorithm == algorithm and (key_id is None or k.key_id in (None, key_id))
        ]
        if not candidates:
            raise UserBindingFailed(f"{METADATA_KEY} names a signing key this broker does not know")
        claims = self._decode(token, algorithm, candidates)
        if claims.get("sub") != user_id:
            raise UserBindingFailed(f"{METADATA_KEY} is not for this user_id")

    def _decode(self, token: str, algorithm: str, candidates: list[_Key]) -> dict[str, Any]:
        for index, key in enumerate(candidates):
            try:
                return jwt.decode(
                    token,
                    key.key,
                    algorithms=[algorithm],
                    audience=self.audience,
                    leeway=self.leeway,
                    options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
                )
            except jwt.InvalidSignatureError:
                if index + 1 < len(candidates):
                    continue  # no `kid`: try the next key of this algorithm
                raise UserBindingFailed(f"{METADATA_KEY} signature does not verify") from None
            except jwt.ExpiredSignatureError:
                raise UserBindingFailed(f"{METADATA_KEY} has expired") from None
            except jwt.InvalidAudienceError:
                raise UserBindingFailed(f"{METADATA_KEY} audience does not match") from None
            except jwt.MissingRequiredClaimError:
                raise UserBindingFailed(f"{METADATA_KEY} lacks a required claim (sub, exp, aud)") from None
            except jwt.ImmatureSignatureError:
                raise UserBindingFailed(f"{METADATA_KEY} is not valid yet") from None
            except jwt.PyJWTError:
                raise UserBindingFailed(f"{METADATA_KEY} is malformed or not valid") from None
        raise AssertionError("no candidate keys")


def load_jwks(path: Path) -> list[jwt.PyJWK]:
    """The RS256 / ES256 public keys of a JWKS file ({"keys": [...]}); ConfigError if there are none.
    Messages never quote the file (a misplaced private key must not reach a log)."""
    variable = "KEYBROKER_USER_JWKS_FILE"
    try:
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except ValueError:
        raise ConfigError(f"{variable}: {path} is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f'{variable}: {path} is not a JWKS (an object with a "keys" list)')
    keys: list[jwt.PyJWK] = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if "d" in entry or entry.get("kty") == "oct":
            raise ConfigError(f"{variable}: {path} holds a private or symmetric key; give public keys only")
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue  # a key type or curve that is not ours to use
        if key.algorithm_name in JWKS_ALGORITHMS:
            keys.append(key)
    if not keys:
        raise ConfigError(f"{variable}: {path} has no {' or '.join(JWKS_ALGORITHMS)} public key")
    return keys


def _token_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    values = [value for key, value in metadata or () if key == METADATA_KEY]
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        raise UserBindingFailed(f"{METADATA_KEY} must be sent once, as text")
    token = values[0].strip()
    scheme, _, rest = token.partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else token  # a forwarded Authorization value


class UserBindingInterceptor(grpc.aio.ServerInterceptor):
    """Runs the binding check before GetKey and CheckLimit (after the caller-token check, which
    the interceptor before this one does); every other RPC passes untouched."""

    def __init__(self, binding: UserBinding) -> None:
        self.binding = binding

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler_call_details.method not in BOUND_METHODS:
            return handler
        metadata = handler_call_details.invocation_metadata
        inner = handler.unary_unary
        binding = self.binding

        async def bound(request: Any, context: grpc.aio.ServicerContext) -> Any:
            binding.verify(_token_of(metadata), request.user_id)
            return await inner(request, context)

        return handler._replace(unary_unary=bound)
