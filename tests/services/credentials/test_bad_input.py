"""Bad input: precise status, ErrorInfo reason and field, and nothing half-written."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2

from bulkhead.credentials.v1 import credentials_pb2 as pb
from tests.services.credentials.conftest import expect_error


async def test_invalid_names_are_refused(h):
    """Names that could escape the tenant's path, or are empty, are INVALID_ARGUMENT on every RPC."""
    for name in ("", "../other", "a/b", ".hidden", "x" * 129, "spaces here"):
        details, _ = await expect_error(grpc.StatusCode.INVALID_ARGUMENT, h.put(name, b"some-value"))
        assert details["reason"] == "SECRET_NAME_INVALID" and "name" in details["bad_request"]
    for call in (
        h.stub.GetSecret(pb.GetSecretRequest(name="../x"), metadata=h.md()),
        h.stub.DescribeSecret(pb.DescribeSecretRequest(name="a/b"), metadata=h.md()),
        h.stub.RotateSecret(pb.RotateSecretRequest(name=""), metadata=h.md()),
        h.stub.DeleteSecret(pb.DeleteSecretRequest(name="a b"), metadata=h.md()),
        h.stub.DestroySecret(pb.DestroySecretRequest(name="/"), metadata=h.md()),
    ):
        details, _ = await expect_error(grpc.StatusCode.INVALID_ARGUMENT, call)
        assert details["reason"] == "SECRET_NAME_INVALID"
    assert not (await h.stub.ListSecrets(pb.ListSecretsRequest(show_deleted=True), metadata=h.md())).secrets


async def test_invalid_secret_fields_are_refused_together(h):
    """Oversized value, negative cas and too-short rotation are reported field by field, nothing stored."""
    details, _ = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        h.put("fine-name", b"x" * (64 * 1024 + 1), cas=-1, rotation_period=duration_pb2.Duration(seconds=5)),
    )
    assert details["reason"] == "SECRET_INVALID"
    assert set(details["bad_request"]) == {"value", "cas", "rotation_period"}
    await expect_error(
        grpc.StatusCode.NOT_FOUND, h.stub.DescribeSecret(pb.DescribeSecretRequest(name="fine-name"), metadata=h.md())
    )


async def test_periods_beyond_a_century_are_refused_before_anything_is_written(h):
    """A rotation or grace period too long to schedule (its microsecond timestamp would overflow a 64-bit
    integer) is INVALID_ARGUMENT naming the field, and no version is written."""
    huge = duration_pb2.Duration(seconds=2**53 - 1)
    details, _ = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, h.put("far", b"some-value", rotation_period=huge, grace_period=huge)
    )
    assert details["reason"] == "SECRET_INVALID"
    assert set(details["bad_request"]) == {"rotation_period", "grace_period"}
    await expect_error(
        grpc.StatusCode.NOT_FOUND, h.stub.DescribeSecret(pb.DescribeSecretRequest(name="far"), metadata=h.md())
    )
    assert not (await h.stub.ListSecrets(pb.ListSecretsRequest(show_deleted=True), metadata=h.md())).secrets
    century = duration_pb2.Duration(seconds=100 * 366 * 24 * 3600)
    assert (await h.put("far", b"some-value", rotation_period=century, grace_period=century)).current_version == 1


async def test_unknown_rotator_is_refused(h):
    """A rotator nobody registered is INVALID_ARGUMENT naming the field."""
    details, _ = await expect_error(grpc.StatusCode.INVALID_ARGUMENT, h.put("r", b"some-value", rotator="nope"))
    assert details["reason"] == "ROTATOR_UNKNOWN" and "rotator" in details["bad_request"]


async def test_negative_version_and_duration_are_refused(h):
    """A negative version or grace period is INVALID_ARGUMENT."""
    await h.put("v", b"some-value")
    details, _ = await expect_error(grpc.StatusCode.INVALID_ARGUMENT, h.get("v", version=-1))
    assert details["reason"] == "INVALID_VERSION"
    details, _ = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, h.put("v", b"other-value", grace_period=duration_pb2.Duration(seconds=-1))
    )
    assert details["reason"] == "DURATION_INVALID"
    assert (await h.get("v")).version == 1


async def test_missing_version_is_not_found(h):
    """A version that never existed is NOT_FOUND with its own reason."""
    await h.put("v", b"some-value")
    details, _ = await expect_error(grpc.StatusCode.NOT_FOUND, h.get("v", version=7))
    assert details["reason"] == "SECRET_VERSION_NOT_FOUND"


async def test_malformed_page_tokens_are_refused(h):
    """Page tokens this service did not issue are INVALID_ARGUMENT."""
    details, _ = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        h.stub.ListSecrets(pb.ListSecretsRequest(page_token="%%%not-a-token"), metadata=h.md()),
    )
    assert details["reason"] == "INVALID_PAGE_TOKEN"
    details, _ = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        h.stub.ListAccessEvents(pb.ListAccessEventsRequest(page_token="%%%"), metadata=h.md()),
    )
    assert details["reason"] == "INVALID_PAGE_TOKEN"
    details, _ = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, h.stub.ListSecrets(pb.ListSecretsRequest(page_size=-1), metadata=h.md())
    )
    assert "page_size" in details["bad_request"]
    details, _ = await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        h.stub.ListAccessEvents(pb.ListAccessEventsRequest(page_size=-5), metadata=h.md()),
    )
    assert details["reason"] == "INVALID_PAGE_SIZE" and "page_size" in details["bad_request"]
