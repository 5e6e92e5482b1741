"""Tiers live once: the Tier type, its proto enum both ways, and acting_for, which cannot be called without one."""

from __future__ import annotations

import pytest

from bulkhead.common.v1 import tenancy_pb2
from shared.tenancy import (
    TIERS,
    NoTenantContext,
    TenantContext,
    acting_for,
    current_tenant,
    tenant_scope,
)
from shared.tiers import Tier, UnknownTier, tier_from_proto, tier_to_proto

OPERATOR = TenantContext("t_platform", "p_op", frozenset({"platform.operator"}), request_id="req-1")


def test_every_tier_round_trips_through_the_proto_enum():
    """Each tier maps to its own enum value and back; the enum has no value we do not map."""
    values = {tier: tier_to_proto(tier) for tier in Tier}
    assert values == {
        Tier.POOLED: tenancy_pb2.TIER_POOLED,
        Tier.BRIDGE: tenancy_pb2.TIER_BRIDGE,
        Tier.SILO: tenancy_pb2.TIER_SILO,
    }
    assert all(tier_from_proto(v) is tier for tier, v in values.items())
    named = {v.number for v in tenancy_pb2.Tier.DESCRIPTOR.values} - {tenancy_pb2.TIER_UNSPECIFIED}
    assert named == set(values.values())
    assert TIERS == ("pooled", "bridge", "silo")


def test_unset_enum_is_pooled_as_the_proto_says_and_unknown_values_raise():
    assert tier_from_proto(tenancy_pb2.TIER_UNSPECIFIED) is Tier.POOLED
    with pytest.raises(UnknownTier):
        tier_from_proto(99)
    for bad in ("", "Bridge", "shared", "TIER_SILO"):
        with pytest.raises(UnknownTier):
            tier_to_proto(bad)
    assert issubclass(UnknownTier, ValueError)


def test_names_parse_to_tiers_that_equal_the_strings_tokens_carry():
    assert Tier.parse("silo") is Tier.SILO and Tier.parse(Tier.BRIDGE) is Tier.BRIDGE
    assert Tier.BRIDGE == "bridge" and f"{Tier.SILO}" == "silo"


@pytest.mark.parametrize("tier", ["bridge", Tier.SILO])
def test_acting_for_binds_the_target_with_its_tier_and_restores_the_caller(tier):
    """Inside: the target tenant at the given tier, no scopes or token, the caller as actor; after: the caller."""
    with tenant_scope(OPERATOR):
        with acting_for("t_target", tier=tier) as ctx:
            assert current_tenant() is ctx
            assert (ctx.tenant_id, ctx.tier, ctx.principal_id, ctx.actor_id, ctx.request_id) == (
                "t_target",
                str(tier),
                "p_op",
                "p_op",
                "req-1",
            )
            assert type(ctx.tier) is str  # a plain string, as the token path gives it
            assert not ctx.scopes and not ctx.token
        assert current_tenant() is OPERATOR


def test_acting_for_cannot_be_called_wrongly():
    """No tier, a positional tier, an unknown tier, no tenant or no caller: each refused, nothing bound."""
    with tenant_scope(OPERATOR):
        with pytest.raises(TypeError):
            with acting_for("t_target"):  # type: ignore[call-arg]
                pass
        with pytest.raises(TypeError):
            with acting_for("t_target", "bridge"):  # type: ignore[misc]
                pass
        for bad in ("", "Pooled", None):
            with pytest.raises(UnknownTier):
                with acting_for("t_target", tier=bad):  # type: ignore[arg-type]
                    pass
        with pytest.raises(ValueError):
            with acting_for("", tier="pooled"):
                pass
        assert current_tenant() is OPERATOR
    with pytest.raises(NoTenantContext):
        with acting_for("t_target", tier="pooled"):
            pass
