"""Tenant B against tenant A's secrets and keys: every RPC is refused without leaking existence."""

from __future__ import annotations

import grpc

from bulkhead.credentials.v1 import credentials_pb2 as pb
from tests.services.credentials.conftest import expect_error


async def _not_found_like_a_missing_name(h, call_for) -> None:
    """call_for(name) on A's secret as B fails exactly like on a name that exists nowhere."""
    theirs, their_msg = await expect_error(grpc.StatusCode.NOT_FOUND, call_for("shared-name"))
    nobody, nobody_msg = await expect_error(grpc.StatusCode.NOT_FOUND, call_for("no-such-name"))
    assert theirs["reason"] == nobody["reason"] == "SECRET_NOT_FOUND"
    assert their_msg == nobody_msg


async def test_every_secret_rpc_on_another_tenants_secret_is_not_found(h):
    """Get/Describe/Rotate/Delete/Destroy by B on A's secret: NOT_FOUND, identical to a missing one."""
    await h.put("shared-name", b"alpha-only-value")
    b = h.md(h.beta)
    await _not_found_like_a_missing_name(h, lambda n: h.stub.GetSecret(pb.GetSecretRequest(name=n), metadata=b))
    await _not_found_like_a_missing_name(
        h, lambda n: h.stub.GetSecret(pb.GetSecretRequest(name=n, version=1), metadata=b)
    )
    await _not_found_like_a_missing_name(
        h, lambda n: h.stub.DescribeSecret(pb.DescribeSecretRequest(name=n), metadata=b)
    )
    await _not_found_like_a_missing_name(h, lambda n: h.stub.RotateSecret(pb.RotateSecretRequest(name=n), metadata=b))
    await _not_found_like_a_missing_name(h, lambda n: h.stub.DeleteSecret(pb.DeleteSecretRequest(name=n), metadata=b))
    await _not_found_like_a_missing_name(h, lambda n: h.stub.DestroySecret(pb.DestroySecretRequest(name=n), metadata=b))
    # A's secret is untouched by all of that.
    got = await h.get("shared-name")
    assert (got.version, got.value) == (1, b"alpha-only-value")


async def test_put_with_the_same_name_makes_separate_secrets(h):
    """B writing A's name creates B's own secret; neither sees the other's value or versions."""
    await h.put("shared-name", b"alpha-value-1")
    await h.put("shared-name", b"alpha-value-2")
    beta = await h.put("shared-name", b"beta-value", tenant=h.beta, cas=0)
    assert beta.current_version == 1
    assert (await h.get("shared-name", tenant=h.beta)).value == b"beta-value"
    assert (await h.get("shared-name")).value == b"alpha-value-2"


async def test_list_and_audit_show_only_the_callers_tenant(h):
    """ListSecrets and ListAccessEvents of B contain nothing of A; Verify checks only B's chain."""
    await h.put("alpha-secret", b"alpha-value")
    await h.get("alpha-secret")
    b = h.md(h.beta)
    assert not (await h.stub.ListSecrets(pb.ListSecretsRequest(show_deleted=True), metadata=b)).secrets
    assert not await h.events(h.beta, secret_name="alpha-secret")
    own = (await h.stub.ListAccessEvents(pb.ListAccessEventsRequest(), metadata=b)).events
    assert [(e.action, e.secret_name) for e in own] == [(pb.ACCESS_ACTION_LIST, "")]  # B's own ListSecrets
    verify = await h.stub.VerifyAccessEvents(pb.VerifyAccessEventsRequest(), metadata=b)
    assert verify.intact and verify.events_checked == 1


async def test_another_tenants_ciphertext_does_not_decrypt(h):
    """B cannot Decrypt or Rewrap A's ciphertext or wrapped data key: the same error as for garbage."""
    enc = await h.stub.Encrypt(pb.EncryptRequest(plaintext=b"alpha data"), metadata=h.md())
    key = await h.stub.GenerateDataKey(pb.GenerateDataKeyRequest(), metadata=h.md())
    b = h.md(h.beta)
    await h.stub.Encrypt(pb.EncryptRequest(plaintext=b"make beta's key exist"), metadata=b)
    for ciphertext in (enc.ciphertext, key.wrapped_key):
        details, msg = await expect_error(
            grpc.StatusCode.INVALID_ARGUMENT, h.stub.Decrypt(pb.DecryptRequest(ciphertext=ciphertext), metadata=b)
        )
        garbage, garbage_msg = await expect_error(
            grpc.StatusCode.INVALID_ARGUMENT, h.stub.Decrypt(pb.DecryptRequest(ciphertext=b"garbage"), metadata=b)
        )
        assert details == garbage and msg == garbage_msg and details["reason"] == "DECRYPTION_FAILED"
        details, _ = await expect_error(
            grpc.StatusCode.INVALID_ARGUMENT, h.stub.Rewrap(pb.RewrapRequest(ciphertext=ciphertext), metadata=b)
        )
        assert details["reason"] == "DECRYPTION_FAILED"
    denied = [e for e in await h.events(h.beta) if e.action == pb.ACCESS_ACTION_DECRYPT]
    assert denied and all(e.outcome == pb.ACCESS_OUTCOME_DENIED for e in denied)


async def test_key_operations_of_one_tenant_leave_the_other_alone(h):
    """B rotating its key or generating data keys changes nothing for A."""
    enc = await h.stub.Encrypt(pb.EncryptRequest(plaintext=b"alpha data"), metadata=h.md())
    b = h.md(h.beta)
    assert (await h.stub.RotateKey(pb.RotateKeyRequest(), metadata=b)).key_version == 2
    beta_key = await h.stub.GenerateDataKey(pb.GenerateDataKeyRequest(), metadata=b)
    assert beta_key.key_version == 2
    assert (await h.stub.Encrypt(pb.EncryptRequest(plaintext=b"x"), metadata=h.md())).key_version == 1
    assert (
        await h.stub.Decrypt(pb.DecryptRequest(ciphertext=enc.ciphertext), metadata=h.md())
    ).plaintext == b"alpha data"
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        h.stub.Decrypt(pb.DecryptRequest(ciphertext=beta_key.wrapped_key), metadata=h.md()),
    )


async def test_token_of_one_tenant_with_another_tenant_header_is_refused(h):
    """A's token presented with x-tenant-id of B is refused before any handler runs."""
    await h.put("alpha-secret", b"alpha-value")
    token_md = dict(h.md(h.alpha))
    md = (("authorization", token_md["authorization"]), ("x-tenant-id", h.beta))
    await expect_error(
        grpc.StatusCode.PERMISSION_DENIED, h.stub.GetSecret(pb.GetSecretRequest(name="alpha-secret"), metadata=md)
    )
    await expect_error(
        grpc.StatusCode.UNAUTHENTICATED,
        h.stub.GetSecret(pb.GetSecretRequest(name="alpha-secret"), metadata=(("x-tenant-id", h.alpha),)),
    )
