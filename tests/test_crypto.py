"""Envelope encryption: pure unit tests of the sealing rules."""

from __future__ import annotations

import base64
import os

import pytest

from broker import crypto


def ring(spec: str | None = None) -> crypto.KeyRing:
    return crypto.parse_master_key(spec or crypto.generate_master_key())


def test_a_sealed_secret_opens_only_for_its_own_row() -> None:
    keys = ring()
    identity = crypto.key_row_identity("alice", 1, "hash-a")
    kek_id, sealed = crypto.seal(keys, "sk-or-v1-" + "ab" * 32, identity)
    assert b"sk-or-v1" not in sealed
    assert crypto.open_sealed(keys, kek_id, sealed, identity) == "sk-or-v1-" + "ab" * 32
    for other in (
        crypto.key_row_identity("bob", 1, "hash-a"),
        crypto.key_row_identity("alice", 2, "hash-a"),
        crypto.key_row_identity("alice", 1, "hash-b"),
    ):
        with pytest.raises(crypto.SealError):
            crypto.open_sealed(keys, kek_id, sealed, other)


def test_a_tampered_or_foreign_ciphertext_does_not_open() -> None:
    keys = ring()
    identity = crypto.key_row_identity("alice", 1, "h")
    kek_id, sealed = crypto.seal(keys, "secret", identity)
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(crypto.SealError):
        crypto.open_sealed(keys, kek_id, flipped, identity)
    with pytest.raises(crypto.SealError, match="not in KEYBROKER_MASTER_KEY"):
        crypto.open_sealed(keys, "other", sealed, identity)
    with pytest.raises(crypto.SealError):
        crypto.open_sealed(ring(), kek_id, sealed, identity)


def test_the_last_key_of_a_list_seals_and_older_keys_still_open() -> None:
    old_key = base64.b64encode(os.urandom(32)).decode()
    new_key = base64.b64encode(os.urandom(32)).decode()
    old_ring = crypto.parse_master_key(f"old:{old_key}")
    both = crypto.parse_master_key(f"old:{old_key},new:{new_key}")
    identity = crypto.key_row_identity("u", 1, "h")
    kek_id, sealed = crypto.seal(old_ring, "s", identity)
    assert both.sealing_id == "new"
    assert crypto.open_sealed(both, kek_id, sealed, identity) == "s"
    new_id, resealed = crypto.reseal(both, kek_id, sealed, identity)
    assert new_id == "new" and crypto.open_sealed(both, new_id, resealed, identity) == "s"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("not-base64!!", "not valid base64"),
        (base64.b64encode(b"short").decode(), "32 bytes"),
        (
            "a:"
            + base64.b64encode(os.urandom(32)).decode()
            + ",a:"
            + base64.b64encode(os.urandom(32)).decode(),
            "twice",
        ),
    ],
)
def test_a_malformed_master_key_is_a_clear_error_without_key_material(spec: str, message: str) -> None:
    with pytest.raises(crypto.MasterKeyError, match=message) as info:
        crypto.parse_master_key(spec)
    if len(spec) > 8:
        assert spec not in str(info.value)
    assert "KeyRing" not in repr(ring()) or "ids=" in repr(ring())
