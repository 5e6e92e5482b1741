"""The local backend: master key file handling, and ciphertexts bound to their tenant and place."""

from __future__ import annotations

import os
import stat

import pytest

from services.credentials.backend import TenantRef
from services.credentials.local_backend import LocalBackend
from services.credentials.master_key import load_or_create_master_key
from shared.errors import BulkheadError, FailedPrecondition
from shared.tenancy import TenantContext, tenant_scope


def test_master_key_is_created_0600_and_reloaded(tmp_path):
    """The first load creates a 32-byte key readable by the owner only; later loads return it."""
    path = tmp_path / "keys" / "master.key"
    key = load_or_create_master_key(path)
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_master_key(path) == key


def test_a_readable_master_key_is_refused(tmp_path):
    """A key file group or others can read is refused, not used."""
    path = tmp_path / "master.key"
    load_or_create_master_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(FailedPrecondition) as info:
        load_or_create_master_key(path)
    assert info.value.reason == "MASTER_KEY_INSECURE"


async def test_values_survive_a_restart_with_the_same_master_key(lh, tmp_path):
    """A new backend over the same database and master key reads what the old one wrote."""
    await lh.put("persisted", b"persisted-value")
    again = LocalBackend(lh.service.db, load_or_create_master_key(tmp_path / "keys" / "master.key"))
    with tenant_scope(TenantContext(lh.alpha, "p_test")):
        assert (await again.read(TenantRef(lh.alpha), "persisted")).value == b"persisted-value"


async def test_another_master_key_opens_nothing(lh, tmp_path):
    """With a different master key the tenant's data keys do not unwrap."""
    await lh.put("persisted", b"persisted-value")
    stranger = LocalBackend(lh.service.db, load_or_create_master_key(tmp_path / "other" / "master.key"))
    with tenant_scope(TenantContext(lh.alpha, "p_test")):
        with pytest.raises(BulkheadError) as info:
            await stranger.read(TenantRef(lh.alpha), "persisted")
    assert info.value.reason == "MASTER_KEY_MISMATCH"


async def test_a_sealed_value_moved_to_another_tenant_does_not_open(lh):
    """Rows carry their tenant in the AES-GCM associated data: moving one across tenants breaks it."""
    await lh.put("moved", b"alpha-only-value")
    await lh.put("moved", b"beta-own-value", tenant=lh.beta)
    await lh.raw("DELETE FROM cred_local_values WHERE tenant_id = :b", {"b": lh.beta})
    await lh.raw("UPDATE cred_local_values SET tenant_id = :b WHERE tenant_id = :a", {"a": lh.alpha, "b": lh.beta})
    with tenant_scope(TenantContext(lh.beta, "p_test")):
        with pytest.raises(BulkheadError) as info:
            await lh.service.backend.read(TenantRef(lh.beta), "moved")
    assert info.value.reason == "VALUE_INTEGRITY"
