"""Secrets CRUD, versions, check-and-set, rotation, soft delete and destroy, on both backends."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import duration_pb2

from bulkhead.credentials.v1 import credentials_pb2 as pb
from services.credentials.backend import TenantRef
from shared.errors import NotFound
from shared.tenancy import TenantContext, require_tenant, tenant_scope
from tests.services.credentials.conftest import expect_error


async def test_put_then_get_returns_the_value(h):
    """A value written is read back, at version 1."""
    secret = await h.put("api-key", b"s3cr3t-value-1")
    assert secret.current_version == 1
    got = await h.get("api-key")
    assert (got.name, got.version, got.value) == ("api-key", 1, b"s3cr3t-value-1")


async def test_each_put_adds_a_version_and_old_ones_stay_readable(h):
    """Versions count up; a previous version is readable by number inside its grace period."""
    for i in range(1, 4):
        assert (await h.put("db-password", f"value-{i}".encode())).current_version == i
    assert (await h.get("db-password")).value == b"value-3"
    old = await h.get("db-password", version=1)
    assert (old.version, old.value) == (1, b"value-1")


async def test_binary_values_round_trip(h):
    """Values are bytes, not text."""
    value = bytes(range(256))
    await h.put("blob", value)
    assert (await h.get("blob")).value == value


async def test_cas_zero_creates_only_when_absent(h):
    """cas=0 writes a new secret and is ABORTED once it exists."""
    assert (await h.put("token", b"first-value", cas=0)).current_version == 1
    details, _ = await expect_error(grpc.StatusCode.ABORTED, h.put("token", b"second-value", cas=0))
    assert details["reason"] == "CAS_MISMATCH"


async def test_cas_mismatch_is_aborted_and_changes_nothing(h):
    """A stale cas is ABORTED; the secret keeps its version and value."""
    await h.put("token", b"value-one")
    await h.put("token", b"value-two")
    details, _ = await expect_error(grpc.StatusCode.ABORTED, h.put("token", b"value-lost", cas=1))
    assert details["reason"] == "CAS_MISMATCH"
    described = (await h.stub.DescribeSecret(pb.DescribeSecretRequest(name="token"), metadata=h.md())).secret
    assert described.current_version == 2 and len(described.versions) == 2
    assert (await h.get("token")).value == b"value-two"
    assert (await h.put("token", b"value-three", cas=2)).current_version == 3


async def test_list_is_metadata_only_and_paged(h):
    """ListSecrets pages by name and never carries values."""
    for name in ("a-one", "b-two", "c-three"):
        await h.put(name, b"value-" + name.encode())
    first = await h.stub.ListSecrets(pb.ListSecretsRequest(page_size=2), metadata=h.md())
    assert [s.name for s in first.secrets] == ["a-one", "b-two"] and first.next_page_token
    second = await h.stub.ListSecrets(
        pb.ListSecretsRequest(page_size=2, page_token=first.next_page_token), metadata=h.md()
    )
    assert [s.name for s in second.secrets] == ["c-three"] and not second.next_page_token
    assert b"value-" not in first.SerializeToString() + second.SerializeToString()


async def test_describe_shows_versions_rotation_and_last_access(h):
    """DescribeSecret reports every version, the rotation schedule and the last read."""
    await h.put("svc", b"value-one", rotation_period=duration_pb2.Duration(seconds=3600), description="svc key")
    before = (await h.stub.DescribeSecret(pb.DescribeSecretRequest(name="svc"), metadata=h.md())).secret
    assert not before.HasField("last_access_time")
    assert before.rotation_period.seconds == 3600 and before.HasField("next_rotation_time")
    await h.put("svc", b"value-two")
    await h.get("svc")
    after = (await h.stub.DescribeSecret(pb.DescribeSecretRequest(name="svc"), metadata=h.md())).secret
    assert after.HasField("last_access_time") and after.description == "svc key"
    assert [(v.version, v.state) for v in after.versions] == [
        (1, pb.SECRET_VERSION_STATE_PREVIOUS),
        (2, pb.SECRET_VERSION_STATE_CURRENT),
    ]
    assert after.versions[0].HasField("expire_time") and after.versions[1].origin == "put"


async def test_rotate_makes_a_new_random_version(h):
    """RotateSecret writes a fresh value through the rotator; the old one stays readable."""
    await h.put("rotating", b"original-value")
    rotated = (await h.stub.RotateSecret(pb.RotateSecretRequest(name="rotating"), metadata=h.md())).secret
    assert rotated.current_version == 2
    new = await h.get("rotating")
    assert new.version == 2 and new.value != b"original-value" and len(new.value) >= 32
    assert (await h.get("rotating", version=1)).value == b"original-value"
    described = (await h.stub.DescribeSecret(pb.DescribeSecretRequest(name="rotating"), metadata=h.md())).secret
    assert described.versions[-1].origin == "rotate:random"


async def test_previous_version_is_destroyed_after_its_grace_period(h):
    """Once the grace period is over the scheduler destroys the old version; the current one is kept."""
    await h.put("short-grace", b"old-value", grace_period=duration_pb2.Duration(seconds=1))
    await h.stub.RotateSecret(pb.RotateSecretRequest(name="short-grace"), metadata=h.md())
    assert (await h.get("short-grace", version=1)).value == b"old-value"
    await asyncio.sleep(1.1)
    assert await h.service.scheduler.run_once() >= 1
    details, _ = await expect_error(grpc.StatusCode.NOT_FOUND, h.get("short-grace", version=1))
    assert details["reason"] == "SECRET_VERSION_NOT_FOUND"
    described = (await h.stub.DescribeSecret(pb.DescribeSecretRequest(name="short-grace"), metadata=h.md())).secret
    assert [v.state for v in described.versions] == [pb.SECRET_VERSION_STATE_DESTROYED, pb.SECRET_VERSION_STATE_CURRENT]
    # Destroyed in the backend too, not just hidden by our metadata.
    with tenant_scope(TenantContext(h.alpha, "p_test")), pytest.raises(NotFound):
        await h.service.backend.read(TenantRef.of(require_tenant()), "short-grace", 1)
    assert (await h.get("short-grace")).version == 2


async def test_scheduled_rotation_runs_when_due(h):
    """A secret whose rotation is due is rotated by the background task, under the rotator principal."""
    await h.put("auto", b"first-auto-value", rotation_period=duration_pb2.Duration(seconds=3600))
    await h.raw("UPDATE cred_schedule SET due_us = 0 WHERE secret_name = 'auto' AND kind = 'rotate'")
    assert await h.service.scheduler.run_once() == 1
    got = await h.get("auto")
    assert got.version == 2 and got.value != b"first-auto-value"
    rotations = [e for e in await h.events() if e.action == pb.ACCESS_ACTION_ROTATE]
    assert [(e.principal_id, e.outcome) for e in rotations] == [("svc_credentials_rotator", pb.ACCESS_OUTCOME_ALLOWED)]
    described = (await h.stub.DescribeSecret(pb.DescribeSecretRequest(name="auto"), metadata=h.md())).secret
    assert described.next_rotation_time.seconds > 0


async def test_rotation_turned_off_with_zero_period(h):
    """rotation_period=0 clears the schedule."""
    await h.put("manual", b"some-value", rotation_period=duration_pb2.Duration(seconds=3600))
    await h.put("manual", b"other-value", rotation_period=duration_pb2.Duration(seconds=0))
    described = (await h.stub.DescribeSecret(pb.DescribeSecretRequest(name="manual"), metadata=h.md())).secret
    assert not described.HasField("rotation_period") and not described.HasField("next_rotation_time")
    assert await h.raw("SELECT * FROM cred_schedule WHERE secret_name = 'manual' AND kind = 'rotate'") == []


async def test_soft_delete_hides_the_value_but_keeps_metadata(h):
    """A deleted secret cannot be read or overwritten; it is listed only with show_deleted."""
    await h.put("old-key", b"deleted-value")
    deleted = (await h.stub.DeleteSecret(pb.DeleteSecretRequest(name="old-key"), metadata=h.md())).secret
    assert deleted.HasField("delete_time")
    details, _ = await expect_error(grpc.StatusCode.NOT_FOUND, h.get("old-key"))
    assert details["reason"] == "SECRET_NOT_FOUND"
    details, _ = await expect_error(grpc.StatusCode.NOT_FOUND, h.get("old-key", version=1))
    assert not (await h.stub.ListSecrets(pb.ListSecretsRequest(), metadata=h.md())).secrets
    listed = await h.stub.ListSecrets(pb.ListSecretsRequest(show_deleted=True), metadata=h.md())
    assert [s.name for s in listed.secrets] == ["old-key"]
    details, _ = await expect_error(grpc.StatusCode.FAILED_PRECONDITION, h.put("old-key", b"new-value"))
    assert details["reason"] == "SECRET_DELETED"
    details, _ = await expect_error(
        grpc.StatusCode.NOT_FOUND, h.stub.DeleteSecret(pb.DeleteSecretRequest(name="old-key"), metadata=h.md())
    )


async def test_destroy_removes_everything_and_frees_the_name(h):
    """DestroySecret forgets every version; the name starts again at version 1."""
    await h.put("gone", b"value-one")
    await h.put("gone", b"value-two")
    await h.stub.DeleteSecret(pb.DeleteSecretRequest(name="gone"), metadata=h.md())
    reply = await h.stub.DestroySecret(pb.DestroySecretRequest(name="gone"), metadata=h.md())
    assert reply.destroyed_versions == 2
    await expect_error(
        grpc.StatusCode.NOT_FOUND, h.stub.DescribeSecret(pb.DescribeSecretRequest(name="gone"), metadata=h.md())
    )
    assert (await h.put("gone", b"value-fresh")).current_version == 1
    assert (await h.get("gone")).value == b"value-fresh"


async def test_read_scope_is_needed_for_values(h):
    """A token with write and describe scopes but not credentials.secrets.read cannot read a value."""
    await h.put("guarded", b"guarded-value")
    md = h.md(scopes=("credentials.secrets.write", "credentials.secrets.describe"))
    await expect_error(
        grpc.StatusCode.PERMISSION_DENIED, h.stub.GetSecret(pb.GetSecretRequest(name="guarded"), metadata=md)
    )
    listed = await h.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md)
    assert [s.name for s in listed.secrets] == ["guarded"]
    reader = h.md(scopes=("credentials.secrets.read",))
    assert (await h.stub.GetSecret(pb.GetSecretRequest(name="guarded"), metadata=reader)).value == b"guarded-value"
    await expect_error(
        grpc.StatusCode.PERMISSION_DENIED,
        h.stub.PutSecret(pb.PutSecretRequest(name="guarded", value=b"x-value"), metadata=reader),
    )
    await expect_error(
        grpc.StatusCode.PERMISSION_DENIED,
        h.stub.DestroySecret(
            pb.DestroySecretRequest(name="guarded"), metadata=h.md(scopes=("credentials.secrets.write",))
        ),
    )


async def test_a_stale_rotation_job_is_dropped(h):
    """A due job whose secret no longer exists is removed instead of retried forever."""
    await h.put("ephemeral", b"some-value", rotation_period=duration_pb2.Duration(seconds=3600))
    await h.raw("DELETE FROM cred_secrets WHERE name = 'ephemeral'")
    await h.raw("UPDATE cred_schedule SET due_us = 0 WHERE secret_name = 'ephemeral'")
    assert await h.service.scheduler.run_once() == 1
    assert await h.raw("SELECT * FROM cred_schedule WHERE secret_name = 'ephemeral'") == []


async def test_a_read_after_a_write_sees_it_despite_concurrent_readers(h):
    """Readers in flight during a put never make the next read return the old version."""
    await h.put("hot", b"hot-value-1")
    for round_ in range(2, 5):
        readers = [asyncio.ensure_future(h.get("hot")) for _ in range(10)]
        await h.put("hot", f"hot-value-{round_}".encode())
        assert (await h.get("hot")).value == f"hot-value-{round_}".encode()
        await asyncio.gather(*readers)
