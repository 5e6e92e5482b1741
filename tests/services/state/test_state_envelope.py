"""The envelope's sealing: fresh nonces, bound associated data, one format byte."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.state.envelope import PLAINTEXT, TenantKey, UndecryptableData


def test_sealing_twice_gives_different_ciphertexts_that_both_open():
    """Every seal draws a fresh nonce (seal and seal_many alike), so equal plaintexts do not look equal."""
    key = TenantKey("dk_test", AESGCM(os.urandom(32)))
    items = [(b"aad-%d" % i, b"same plaintext") for i in range(50)]
    blobs = key.seal_many(items) + [key.seal(aad, p) for aad, p in items]
    assert len({b[1:13] for b in blobs}) == len(blobs)
    assert all(key.open(aad, blob) == p for (aad, p), blob in zip(items + items, blobs, strict=True))


def test_wrong_aad_or_tampering_does_not_open():
    """Another row's aad, a flipped bit or a foreign format byte are refused, never misread."""
    key = TenantKey("dk_test", AESGCM(os.urandom(32)))
    blob = key.seal(b"row-1", b"payload")
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    for aad, data in ((b"row-2", blob), (b"row-1", bytes(tampered)), (b"row-1", b"\x02" + blob[1:]), (b"row-1", b"")):
        with pytest.raises(UndecryptableData):
            key.open(aad, data)


def test_plaintext_key_passes_data_through():
    """The development-only plaintext key stores data as is, with an empty key id."""
    assert PLAINTEXT.key_id == ""
    assert PLAINTEXT.seal_many([(b"a", b"x")]) == [b"x"] and PLAINTEXT.open(b"a", b"x") == b"x"
