"""The key of the opaque ids the upstream sees (metadata.user_id, cache partition, attempt ids) is the
deployment's own."""

from __future__ import annotations

import hashlib
import hmac
import stat
import threading

from services.inference.config import SALT_FILE, InferenceConfig, load_or_create_salt
from services.inference.proxy import attempt_ref


def _opaque(salt: str, tenant_id: str) -> str:
    return "bh_" + hmac.new(salt.encode(), tenant_id.encode(), hashlib.sha256).hexdigest()[:32]


def test_a_deployment_without_a_salt_makes_its_own_once(tmp_path):
    """32 random bytes kept owner-only in the data dir; the same on every later start; another deployment's differs."""
    first = load_or_create_salt(tmp_path / "a")
    assert len(first) == 64 and int(first, 16) and first != "bulkhead"
    assert load_or_create_salt(tmp_path / "a") == first
    assert stat.S_IMODE((tmp_path / "a" / SALT_FILE).stat().st_mode) == 0o600
    assert load_or_create_salt(tmp_path / "b") != first
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [SALT_FILE]  # no temporary file left


def test_workers_starting_together_agree_on_one_salt(tmp_path):
    """Concurrent first starts all end up with the one salt that was written first."""
    seen: list[str] = []
    barrier = threading.Barrier(8)

    def make() -> None:
        barrier.wait()
        seen.append(load_or_create_salt(tmp_path))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1 and (tmp_path / SALT_FILE).read_text().strip() == seen[0]


def test_config_names_no_default_salt():
    """Unset means "the deployment's own", never a constant; set means exactly that value (deterministic tests)."""
    assert InferenceConfig.from_env({}).user_id_salt is None
    assert InferenceConfig.from_env({"BULKHEAD_INFERENCE_USER_ID_SALT": "s3"}).user_id_salt == "s3"


async def test_the_proxy_keys_its_upstream_ids_with_the_data_dir_salt(mesh):
    """A proxy started with no salt configured uses its data dir's: not the public "bulkhead" of old."""
    salt = (mesh.tmp / SALT_FILE).read_text().strip()
    proxy = mesh.proxy.proxy
    assert proxy.opaque_user_id("t_a") == _opaque(salt, "t_a") != _opaque("bulkhead", "t_a")
    assert (
        proxy._attempt_ref("t_a", "r1")
        == attempt_ref(salt.encode(), "t_a", "r1")
        != attempt_ref(b"bulkhead", "t_a", "r1")
    )
    public = hmac.new(b"bulkhead", b"prompt-cache-partition\0t_a", hashlib.sha256).hexdigest()[:32]
    assert proxy.cache_partition("t_a") != "cache-partition:" + public


async def test_an_explicit_salt_is_used_as_given(mesh):
    """BULKHEAD_INFERENCE_USER_ID_SALT set: ids are keyed by it (what a fleet sharing one secret sets)."""
    mesh.env_overrides["BULKHEAD_INFERENCE_USER_ID_SALT"] = "fleet-secret"
    other = await mesh.start_proxy("explicit.db")
    assert other.service.proxy.opaque_user_id("t_a") == _opaque("fleet-secret", "t_a")
