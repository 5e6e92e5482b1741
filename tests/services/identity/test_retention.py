"""identity owns each tenant's retention: operators set it (bounded, audited), the tenant reads its
own and no other's, and the services' sweepers list every tenant's with their platform keys."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.common.v1 import audit_pb2 as aud
from bulkhead.common.v1 import audit_pb2_grpc, tenancy_pb2
from bulkhead.identity.v1 import identity_pb2 as pb
from shared.errors import error_details
from shared.retention import DEFAULT_AUDIT_DAYS, DEFAULT_USAGE_DETAIL_DAYS, MAX_DAYS
from testkit.identity import running_identity


async def _error(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


@pytest.fixture
async def identity(tmp_path):
    async with running_identity(tmp_path) as harness:
        yield harness


async def test_defaults_then_operator_sets_tenant_reads_and_audit_records(identity):
    op = identity.operator.metadata
    acme = await identity.tenant("acme", tier=tenancy_pb2.TIER_BRIDGE)
    other = await identity.tenant("globex")
    own = await identity.stub.GetRetentionPolicy(pb.GetRetentionPolicyRequest(), metadata=acme.metadata)
    assert (own.retention.audit_days, own.retention.usage_detail_days) == (
        DEFAULT_AUDIT_DAYS,
        DEFAULT_USAGE_DETAIL_DAYS,
    )
    assert own.retention.audit_days_default and own.retention.usage_detail_days_default

    set_ = await identity.stub.SetRetentionPolicy(
        pb.SetRetentionPolicyRequest(tenant_id=acme.tenant_id, audit_days=30, usage_detail_days=2555), metadata=op
    )
    assert (set_.retention.audit_days, set_.retention.usage_detail_days) == (30, 2555)
    assert not set_.retention.audit_days_default
    again = await identity.stub.SetRetentionPolicy(
        pb.SetRetentionPolicyRequest(tenant_id=acme.tenant_id, audit_days=30, usage_detail_days=2555), metadata=op
    )
    assert again.retention == set_.retention

    own = await identity.stub.GetRetentionPolicy(
        pb.GetRetentionPolicyRequest(tenant_id=acme.tenant_id), metadata=acme.metadata
    )
    assert own.retention == set_.retention
    tenant = await identity.stub.GetTenant(pb.GetTenantRequest(), metadata=acme.metadata)
    assert tenant.tenant.retention == set_.retention
    theirs = await identity.stub.GetRetentionPolicy(pb.GetRetentionPolicyRequest(), metadata=other.metadata)
    assert theirs.retention.audit_days == DEFAULT_AUDIT_DAYS  # only acme changed

    # One configuration event (the repeat changed nothing), on acme's chain, with the operator as actor.
    audit = audit_pb2_grpc.ConfigAuditServiceStub(identity.channel)
    events = await audit.ListAuditEvents(aud.ListAuditEventsRequest(action="tenant.retention"), metadata=acme.metadata)
    assert [(e.action, e.target, dict(e.detail)) for e in events.events] == [
        ("tenant.retention", f"tenant/{acme.tenant_id}", {"audit_days": "30", "usage_detail_days": "2555"})
    ]
    actor = events.events[0].actor
    assert actor.operator_id and actor.operator_id == actor.principal_id  # the operator, not the tenant

    # 0 puts a field back to its default.
    back = await identity.stub.SetRetentionPolicy(
        pb.SetRetentionPolicyRequest(tenant_id=acme.tenant_id, audit_days=0, usage_detail_days=7), metadata=op
    )
    assert (back.retention.audit_days, back.retention.usage_detail_days) == (DEFAULT_AUDIT_DAYS, 7)
    assert back.retention.audit_days_default and not back.retention.usage_detail_days_default


async def test_tenant_cannot_read_anothers_or_set_its_own(identity):
    acme = await identity.tenant("acme")
    other = await identity.tenant("globex")
    await identity.stub.SetRetentionPolicy(
        pb.SetRetentionPolicyRequest(tenant_id=other.tenant_id, audit_days=5), metadata=identity.operator.metadata
    )
    real = await _error(
        identity.stub.GetRetentionPolicy(
            pb.GetRetentionPolicyRequest(tenant_id=other.tenant_id), metadata=acme.metadata
        )
    )
    made_up = await _error(
        identity.stub.GetRetentionPolicy(
            pb.GetRetentionPolicyRequest(tenant_id="t_nobody12345"), metadata=acme.metadata
        )
    )
    assert (
        (real.code(), real.details(), error_details(real)["reason"])
        == (made_up.code(), made_up.details(), error_details(made_up)["reason"])
        == (grpc.StatusCode.NOT_FOUND, "tenant not found", "TENANT_NOT_FOUND")
    )
    for who in (acme, other):  # setting retention is the operator's, not even for oneself
        err = await _error(
            identity.stub.SetRetentionPolicy(
                pb.SetRetentionPolicyRequest(tenant_id=who.tenant_id, audit_days=1), metadata=acme.metadata
            )
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await _error(identity.stub.ListRetentionPolicies(pb.ListRetentionPoliciesRequest(), metadata=acme.metadata))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (
        await identity.stub.GetRetentionPolicy(
            pb.GetRetentionPolicyRequest(tenant_id=other.tenant_id), metadata=identity.operator.metadata
        )
    ).retention.audit_days == 5


@pytest.mark.parametrize(
    ("audit_days", "usage_days", "field"),
    [
        (-1, 30, "audit_days"),
        (MAX_DAYS + 1, 30, "audit_days"),
        (30, -5, "usage_detail_days"),
        (30, 2**31 - 1, "usage_detail_days"),
    ],
)
async def test_out_of_bounds_is_refused_and_nothing_changes(identity, audit_days, usage_days, field):
    acme = await identity.tenant("acme")
    op = identity.operator.metadata
    err = await _error(
        identity.stub.SetRetentionPolicy(
            pb.SetRetentionPolicyRequest(tenant_id=acme.tenant_id, audit_days=audit_days, usage_detail_days=usage_days),
            metadata=op,
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(err)["reason"] == "RETENTION_OUT_OF_RANGE" and field in error_details(err)["bad_request"]
    now = await identity.stub.GetRetentionPolicy(pb.GetRetentionPolicyRequest(tenant_id=acme.tenant_id), metadata=op)
    assert now.retention.audit_days_default and now.retention.usage_detail_days_default


async def test_unknown_or_missing_tenant(identity):
    op = identity.operator.metadata
    missing = await _error(
        identity.stub.SetRetentionPolicy(
            pb.SetRetentionPolicyRequest(tenant_id="t_nobody12345", audit_days=3), metadata=op
        )
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    empty = await _error(identity.stub.SetRetentionPolicy(pb.SetRetentionPolicyRequest(audit_days=3), metadata=op))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT and "tenant_id" in error_details(empty)["bad_request"]


async def test_platform_services_list_every_tenant_with_tier_in_pages(identity):
    op = identity.operator.metadata
    made = [
        await identity.tenant(f"t{i}-co", tier=tier)
        for i, tier in enumerate((tenancy_pb2.TIER_POOLED, tenancy_pb2.TIER_BRIDGE, tenancy_pb2.TIER_SILO))
    ]
    await identity.stub.SetRetentionPolicy(
        pb.SetRetentionPolicyRequest(tenant_id=made[2].tenant_id, audit_days=1, usage_detail_days=2), metadata=op
    )
    service = await identity.login(identity.service_key_file("metering").read_text().strip())
    seen, token = {}, ""
    while True:
        page = await identity.stub.ListRetentionPolicies(
            pb.ListRetentionPoliciesRequest(page_size=2, page_token=token), metadata=service.metadata
        )
        assert len(page.tenants) <= 2
        seen.update({t.tenant_id: t for t in page.tenants})
        token = page.next_page_token
        if not token:
            break
    assert {m.tenant_id for m in made} <= set(seen)
    assert seen[made[1].tenant_id].tier == tenancy_pb2.TIER_BRIDGE
    silo = seen[made[2].tenant_id]
    assert (silo.tier, silo.retention.audit_days, silo.retention.usage_detail_days) == (tenancy_pb2.TIER_SILO, 1, 2)
    bad = await _error(
        identity.stub.ListRetentionPolicies(pb.ListRetentionPoliciesRequest(page_token="!!"), metadata=service.metadata)
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_identitys_own_sweeper_prunes_its_configuration_chain_from_the_directory(identity):
    """identity's sweeper (wired in its server, policies from its own directory) prunes the tenant's old
    configuration events and ListAuditEvents/VerifyAuditEvents report the anchor."""
    from shared.config_audit import ConfigAudit
    from shared.tenancy import TenantContext
    from tests.retention.test_config_audit_retention import _backdate

    op = identity.operator.metadata
    acme = await identity.tenant("acme")
    await identity.stub.SetRetentionPolicy(
        pb.SetRetentionPolicyRequest(tenant_id=acme.tenant_id, audit_days=1), metadata=op
    )
    for name in ("bot-a", "bot-b"):
        await identity.stub.CreatePrincipal(
            pb.CreatePrincipalRequest(kind=pb.PRINCIPAL_KIND_SERVICE_ACCOUNT, display_name=name, scopes=["state.*"]),
            metadata=acme.metadata,
        )
    audit = ConfigAudit("identity", identity.app.db, key=b"")
    await _backdate(audit, TenantContext(acme.tenant_id, "p", tier="pooled"), 2, days=2)
    assert await identity.app.retention.run_once() == 2
    stub = audit_pb2_grpc.ConfigAuditServiceStub(identity.channel)
    check = await stub.VerifyAuditEvents(aud.VerifyAuditEventsRequest(), metadata=acme.metadata)
    assert check.intact and check.events_checked == 2 and check.anchor.sequence == 2, check
    listed = await stub.ListAuditEvents(aud.ListAuditEventsRequest(oldest_first=True), metadata=acme.metadata)
    assert [e.action for e in listed.events] == ["principal.create", "principal.create"]
    assert listed.anchor.hash == listed.events[0].prev_hash and listed.anchor.time.seconds > 0
    assert await identity.app.retention.run_once() == 0
