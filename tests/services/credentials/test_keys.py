"""Encrypt/Decrypt/GenerateDataKey/RotateKey/Rewrap on the tenant's own key, on both backends."""

from __future__ import annotations

import grpc

from bulkhead.credentials.v1 import credentials_pb2 as pb
from tests.services.credentials.conftest import expect_error


async def test_encrypt_then_decrypt_round_trips(h):
    """Decrypt opens what Encrypt made, and the ciphertext does not contain the plaintext."""
    enc = await h.stub.Encrypt(pb.EncryptRequest(plaintext=b"attack at dawn"), metadata=h.md())
    assert enc.key_version == 1 and b"attack at dawn" not in enc.ciphertext
    dec = await h.stub.Decrypt(pb.DecryptRequest(ciphertext=enc.ciphertext), metadata=h.md())
    assert dec.plaintext == b"attack at dawn"


async def test_generate_data_key_unwraps_to_the_same_key(h):
    """The wrapped data key decrypts to the plaintext key (what the state service relies on)."""
    key = await h.stub.GenerateDataKey(pb.GenerateDataKeyRequest(), metadata=h.md())
    assert len(key.plaintext_key) == 32 and key.wrapped_key and key.key_version == 1
    assert key.plaintext_key not in key.wrapped_key
    dec = await h.stub.Decrypt(pb.DecryptRequest(ciphertext=key.wrapped_key), metadata=h.md())
    assert dec.plaintext == key.plaintext_key
    short = await h.stub.GenerateDataKey(pb.GenerateDataKeyRequest(bits=128), metadata=h.md())
    assert len(short.plaintext_key) == 16


async def test_rotate_key_and_rewrap(h):
    """After rotation old ciphertexts still decrypt; Rewrap moves them to the latest version."""
    old = await h.stub.Encrypt(pb.EncryptRequest(plaintext=b"keep me safe"), metadata=h.md())
    rotated = await h.stub.RotateKey(pb.RotateKeyRequest(), metadata=h.md())
    assert rotated.key_version == 2
    new = await h.stub.Encrypt(pb.EncryptRequest(plaintext=b"fresh data"), metadata=h.md())
    assert new.key_version == 2
    assert (
        await h.stub.Decrypt(pb.DecryptRequest(ciphertext=old.ciphertext), metadata=h.md())
    ).plaintext == b"keep me safe"
    rewrapped = await h.stub.Rewrap(pb.RewrapRequest(ciphertext=old.ciphertext), metadata=h.md())
    assert rewrapped.key_version == 2 and rewrapped.ciphertext != old.ciphertext
    assert (
        await h.stub.Decrypt(pb.DecryptRequest(ciphertext=rewrapped.ciphertext), metadata=h.md())
    ).plaintext == b"keep me safe"


async def test_garbage_ciphertext_is_invalid_argument(h):
    """Anything that is not this tenant's ciphertext is DECRYPTION_FAILED."""
    for junk in (b"not a ciphertext", b"vault:v1:AAAA", b"bulkhead:v1:AAAA", b"\xff\xfe"):
        details, _ = await expect_error(
            grpc.StatusCode.INVALID_ARGUMENT, h.stub.Decrypt(pb.DecryptRequest(ciphertext=junk), metadata=h.md())
        )
        assert details["reason"] == "DECRYPTION_FAILED" and "ciphertext" in details["bad_request"]
    details, _ = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, h.stub.Rewrap(pb.RewrapRequest(ciphertext=b"junk"), metadata=h.md())
    )
    assert details["reason"] == "DECRYPTION_FAILED"


async def test_key_bad_input(h):
    """Empty plaintext/ciphertext and odd key sizes are refused precisely."""
    details, _ = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, h.stub.Encrypt(pb.EncryptRequest(), metadata=h.md())
    )
    assert details["reason"] == "PLAINTEXT_MISSING"
    details, _ = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, h.stub.Decrypt(pb.DecryptRequest(), metadata=h.md())
    )
    assert details["reason"] == "CIPHERTEXT_MISSING"
    details, _ = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, h.stub.GenerateDataKey(pb.GenerateDataKeyRequest(bits=512), metadata=h.md())
    )
    assert details["reason"] == "KEY_BITS_INVALID" and "bits" in details["bad_request"]


async def test_key_scopes_are_enforced(h):
    """Decrypt needs credentials.keys.decrypt; RotateKey needs credentials.keys.rotate."""
    enc_only = h.md(scopes=("credentials.keys.encrypt",))
    enc = await h.stub.Encrypt(pb.EncryptRequest(plaintext=b"scoped"), metadata=enc_only)
    await expect_error(
        grpc.StatusCode.PERMISSION_DENIED,
        h.stub.Decrypt(pb.DecryptRequest(ciphertext=enc.ciphertext), metadata=enc_only),
    )
    await expect_error(grpc.StatusCode.PERMISSION_DENIED, h.stub.RotateKey(pb.RotateKeyRequest(), metadata=enc_only))
