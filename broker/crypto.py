"""Envelope encryption of key secrets (AES-256-GCM). Pure functions and values, no I/O.

Each secret gets its own random data key; the data key is wrapped by a key-encryption key (KEK)
from KEYBROKER_MASTER_KEY. The row's identity is bound in as associated data, so a sealed secret
copied to another row does not open. KEKs carry ids so they can be rotated and rows re-sealed.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_VERSION = 1
NONCE_BYTES = 12
KEY_BYTES = 32
WRAPPED_KEY_BYTES = KEY_BYTES + 16  # ciphertext + GCM tag
DEFAULT_KEK_ID = "k1"
_KEK_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class MasterKeyError(ValueError):
    """KEYBROKER_MASTER_KEY is malformed; the message never contains key material."""


class SealError(ValueError):
    """A sealed secret does not open: wrong key, wrong row, or tampered bytes."""


@dataclass(frozen=True)
class KeyRing:
    """The key-encryption keys by id; `sealing_id` (the last one given) seals new secrets."""

    keys: dict[str, bytes] = field(repr=False)
    sealing_id: str

    def __repr__(self) -> str:
        return f"KeyRing(ids={list(self.keys)}, sealing_id={self.sealing_id!r})"


def parse_master_key(spec: str) -> KeyRing:
    """'BASE64' (one key, id k1) or 'ID:BASE64,ID:BASE64,...' (the last entry seals)."""
    entries = [part.strip() for part in spec.split(",") if part.strip()]
    if not entries:
        raise MasterKeyError("KEYBROKER_MASTER_KEY is empty")
    keys: dict[str, bytes] = {}
    sealing_id = DEFAULT_KEK_ID
    for entry in entries:
        kek_id, sep, encoded = entry.partition(":")
        if not sep:
            if len(entries) > 1:
                raise MasterKeyError("KEYBROKER_MASTER_KEY: with several keys each needs ID:BASE64")
            kek_id, encoded = DEFAULT_KEK_ID, entry
        if not _KEK_ID.fullmatch(kek_id):
            raise MasterKeyError("KEYBROKER_MASTER_KEY: key ids are 1-32 of A-Z a-z 0-9 _ -")
        if kek_id in keys:
            raise MasterKeyError(f"KEYBROKER_MASTER_KEY: key id {kek_id!r} appears twice")
        keys[kek_id] = _decode_key(kek_id, encoded)
        sealing_id = kek_id
    return KeyRing(keys, sealing_id)


def generate_master_key() -> str:
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def seal(ring: KeyRing, secret: str, associated_data: bytes) -> tuple[str, bytes]:
    """Encrypt `secret`; returns (kek id, sealed bytes)."""
    data_key = AESGCM.generate_key(bit_length=256)
    wrap_nonce, nonce = os.urandom(NONCE_BYTES), os.urandom(NONCE_BYTES)
    wrapped = AESGCM(ring.keys[ring.sealing_id]).encrypt(wrap_nonce, data_key, associated_data)
    body = AESGCM(data_key).encrypt(nonce, secret.encode("utf-8"), associated_data)
    return ring.sealing_id, bytes([FORMAT_VERSION]) + wrap_nonce + wrapped + nonce + body


def open_sealed(ring: KeyRing, kek_id: str, sealed: bytes, associated_data: bytes) -> str:
    """Decrypt what `seal` produced for the same row identity."""
    kek = ring.keys.get(kek_id)
    if kek is None:
        raise SealError(f"the key-encryption key {kek_id!r} is not in KEYBROKER_MASTER_KEY")
    header = 1 + NONCE_BYTES + WRAPPED_KEY_BYTES + NONCE_BYTES
    if len(sealed) <= header or sealed[0] != FORMAT_VERSION:
        raise SealError("sealed secret has an unknown format")
    wrap_nonce = sealed[1 : 1 + NONCE_BYTES]
    wrapped = sealed[1 + NONCE_BYTES : 1 + NONCE_BYTES + WRAPPED_KEY_BYTES]
    nonce = sealed[header - NONCE_BYTES : header]
    try:
        data_key = AESGCM(kek).decrypt(wrap_nonce, wrapped, associated_data)
        return AESGCM(data_key).decrypt(nonce, sealed[header:], associated_data).decode("utf-8")
    except InvalidTag:
        raise SealError("sealed secret does not open (wrong key or wrong row)") from None


def reseal(ring: KeyRing, kek_id: str, sealed: bytes, associated_data: bytes) -> tuple[str, bytes]:
    """Re-encrypt under the ring's sealing key (for KEK rotation)."""
    return seal(ring, open_sealed(ring, kek_id, sealed, associated_data), associated_data)


def key_row_identity(user_id: str, key_version: int, key_id: str) -> bytes:
    """Associated data binding a sealed secret to its api_keys row."""
    return f"keybroker/api_keys/v1|{user_id}|{key_version}|{key_id}".encode()


def _decode_key(kek_id: str, encoded: str) -> bytes:
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise MasterKeyError(f"KEYBROKER_MASTER_KEY: key {kek_id!r} is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise MasterKeyError(
            f"KEYBROKER_MASTER_KEY: key {kek_id!r} must be {KEY_BYTES} bytes, base64-encoded"
        )
    return raw
