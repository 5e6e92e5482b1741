"""A PutSecret or RotateSecret whose metadata cannot be written leaves no value behind in the backend: the
version the backend had just written is destroyed again, and the secret reads as it did before; check-and-set
on the metadata's versions keeps working past the number the backend used up. On both backends; the metadata
write is refused by the real database (a trigger), not by a stand-in."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2

from bulkhead.credentials.v1 import credentials_pb2 as pb
from services.credentials.backend import TenantRef
from shared.errors import NotFound
from shared.tenancy import TenantContext, tenant_scope
from tests.services.credentials.conftest import expect_error

REFUSE = (
    "CREATE TRIGGER refuse_versions BEFORE INSERT ON cred_secret_versions "
    "BEGIN SELECT RAISE(ABORT, 'metadata refused'); END"
)


async def backend_read(h, name: str, version: int) -> bytes:
    """The backend's own copy of a version, past the metadata (NotFound once destroyed)."""
    with tenant_scope(TenantContext(h.alpha, "p_test")):
        return (await h.service.backend.read(TenantRef(h.alpha), name, version)).value


async def refused(h, call) -> None:
    """Run `call` while the metadata table refuses new versions: SQLite reports the trigger's refusal as a
    constraint failure, which the manager retries once and then answers ABORTED."""
    await h.raw(REFUSE)
    try:
        await expect_error(grpc.StatusCode.ABORTED, call)
    finally:
        await h.raw("DROP TRIGGER refuse_versions")


async def test_a_put_whose_metadata_is_refused_leaves_no_value_in_the_backend(h):
    await h.put("db-password", b"value-one")
    await refused(h, h.put("db-password", b"value-never-recorded"))

    with pytest.raises(NotFound):
        await backend_read(h, "db-password", 2)
    got = await h.get("db-password")
    assert (got.version, got.value) == (1, b"value-one")
    described = (await h.stub.DescribeSecret(pb.DescribeSecretRequest(name="db-password"), metadata=h.md())).secret
    assert described.current_version == 1 and [v.version for v in described.versions] == [1]

    # The name stays usable, check-and-set on the version DescribeSecret shows included: the backend's used-up
    # number is passed over (never reused), and a stale cas is still refused.
    nxt = await h.put("db-password", b"value-three", cas=1)
    assert nxt.current_version == 3 and (await h.get("db-password")).value == b"value-three"
    assert (await h.get("db-password", version=1)).value == b"value-one"
    details, _ = await expect_error(grpc.StatusCode.ABORTED, h.put("db-password", b"value-stale", cas=1))
    assert details["reason"] == "CAS_MISMATCH"


async def test_a_first_put_refused_leaves_no_secret(h):
    await refused(h, h.put("api-key", b"never-recorded"))

    with pytest.raises(NotFound):
        await backend_read(h, "api-key", 1)
    details, _ = await expect_error(grpc.StatusCode.NOT_FOUND, h.get("api-key"))
    assert details["reason"] == "SECRET_NOT_FOUND"
    assert (await h.put("api-key", b"created-now", cas=0)).current_version == 2  # cas=0: "does not exist" holds
    assert (await h.get("api-key")).value == b"created-now"


async def test_a_rotation_whose_metadata_is_refused_leaves_no_value_in_the_backend(h):
    await h.put("rotated", b"value-one")
    await refused(h, h.stub.RotateSecret(pb.RotateSecretRequest(name="rotated"), metadata=h.md()))

    with pytest.raises(NotFound):
        await backend_read(h, "rotated", 2)
    assert (await h.get("rotated")).value == b"value-one"
    described = (await h.stub.DescribeSecret(pb.DescribeSecretRequest(name="rotated"), metadata=h.md())).secret
    assert described.current_version == 1 and [v.version for v in described.versions] == [1]
    rotated = (await h.stub.RotateSecret(pb.RotateSecretRequest(name="rotated"), metadata=h.md())).secret
    assert rotated.current_version == 3 and (await h.get("rotated")).value != b"value-one"


async def test_a_version_whose_metadata_landed_is_kept_though_the_put_then_failed(h):
    """The schedule is written after the metadata commits: a failure there must not destroy what is recorded."""
    await h.raw(
        "CREATE TRIGGER refuse_schedule BEFORE INSERT ON cred_schedule "
        "BEGIN SELECT RAISE(ABORT, 'schedule refused'); END"
    )
    try:
        period = duration_pb2.Duration(seconds=3600)
        with pytest.raises(grpc.aio.AioRpcError):
            await h.put("scheduled", b"value-recorded", rotation_period=period)
    finally:
        await h.raw("DROP TRIGGER refuse_schedule")

    assert await backend_read(h, "scheduled", 1) == b"value-recorded"
    assert (await h.get("scheduled")).value == b"value-recorded"
