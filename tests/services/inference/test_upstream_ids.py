"""The ids the upstream sees for a tenant (metadata.user_id, prompt-cache partition) are kept per tenant."""

from __future__ import annotations

import hashlib
import hmac

from services.inference.proxy import InferenceProxy


def _expected(salt: str, tenant_id: str) -> tuple[str, str]:
    user = hmac.new(salt.encode(), tenant_id.encode(), hashlib.sha256).hexdigest()[:32]
    part = hmac.new(salt.encode(), b"prompt-cache-partition\0" + tenant_id.encode(), hashlib.sha256).hexdigest()
    return "bh_" + user, "cache-partition:" + part[:32]


def _proxy(salt: str) -> InferenceProxy:
    # The ids need nothing but the salt: the proxy's collaborators are never called here.
    none = None
    return InferenceProxy(
        provider=none,  # type: ignore[arg-type]
        platform_key="k",
        policies=none,  # type: ignore[arg-type]
        platform_policy=none,  # type: ignore[arg-type]
        limiter=none,  # type: ignore[arg-type]
        quotas=none,  # type: ignore[arg-type]
        budget=none,  # type: ignore[arg-type]
        meter=none,  # type: ignore[arg-type]
        keys=none,  # type: ignore[arg-type]
        user_id_salt=salt,
    )


def test_upstream_ids_are_each_tenants_own():
    """B's ids, computed and kept first, never answer for A (nor A's for B), in either order, and a
    proxy of another salt keeps its own."""
    proxy, other = _proxy("s1"), _proxy("s2")
    for t in ("t_b", "t_b", "t_a", "t_a", "t_b"):
        assert (proxy.opaque_user_id(t), proxy.cache_partition(t)) == _expected("s1", t)
        assert (other.opaque_user_id(t), other.cache_partition(t)) == _expected("s2", t)
    assert proxy.opaque_user_id("t_a") != proxy.opaque_user_id("t_b")
    assert proxy.cache_partition("t_a") != proxy.cache_partition("t_b")


def test_the_kept_ids_stay_bounded():
    """Past 10,000 tenants the kept ids are forgotten and made again, still each tenant's own."""
    proxy = _proxy("s1")
    for i in range(10_050):
        proxy.opaque_user_id(f"t_x{i}")
    assert len(proxy._upstream_ids) <= 10_000
    assert proxy.opaque_user_id("t_x3") == _expected("s1", "t_x3")[0]
