"""Tenants never reach each other's provider keys, private models, policies or budgets: every RPC, cross-tenant."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.inference.v1 import inference_pb2 as pb
from shared.errors import error_details
from testkit.fake_anthropic import FakeAnthropic

from .helpers import MODEL, PINNED, PLATFORM_KEY, params

B_KEY = "sk-ant-tenant-b-secret-0123456789"


async def _expect(call, code, reason=None):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    if reason:
        assert error_details(info.value)["reason"] == reason
    return info.value


async def _drain(stream):
    return [e async for e in stream]


async def test_each_tenant_calls_with_its_own_key_or_the_platform_key(mesh):
    """B's own key serves only B; A (no key of its own) gets the platform key, never B's."""
    await mesh.put_tenant_key("t_b", B_KEY)
    a = await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a"))
    b = await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_b"))
    await _drain(mesh.stub.StreamMessage(pb.StreamMessageRequest(params=params()), metadata=mesh.md("t_a")))
    keys = [c.headers["authorization"] for c in mesh.fake.calls]
    assert keys == [f"Bearer {PLATFORM_KEY}", f"Bearer {B_KEY}", f"Bearer {PLATFORM_KEY}"]
    assert not a.call.tenant_key and b.call.tenant_key


async def test_model_outside_allowlist_is_refused(mesh):
    """A model not in the tenant's allowlist: PERMISSION_DENIED before any upstream call, on every call RPC."""
    bad = params(model="claude-forbidden")
    await _expect(
        mesh.stub.CreateMessage(pb.CreateMessageRequest(params=bad), metadata=mesh.md("t_a")),
        grpc.StatusCode.PERMISSION_DENIED,
        "MODEL_NOT_ALLOWED",
    )
    await _expect(
        _drain(mesh.stub.StreamMessage(pb.StreamMessageRequest(params=bad), metadata=mesh.md("t_a"))),
        grpc.StatusCode.PERMISSION_DENIED,
        "MODEL_NOT_ALLOWED",
    )
    await _expect(
        mesh.stub.CountTokens(pb.CountTokensRequest(params=bad), metadata=mesh.md("t_a")),
        grpc.StatusCode.PERMISSION_DENIED,
        "MODEL_NOT_ALLOWED",
    )
    assert mesh.fake.requests == []


async def test_private_model_is_callable_only_by_its_tenant(mesh):
    """B's private model: B calls it (its upstream id goes upstream); for A it is exactly like an unknown model."""
    await mesh.stub.RegisterPrivateModel(
        pb.RegisterPrivateModelRequest(
            model=pb.PrivateModel(
                name="b-tuned", upstream_model="ft:claude-test:b:001", lineage="claude-test tuned on B's tickets"
            )
        ),
        metadata=mesh.md("t_b"),
    )
    b = await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params(model="b-tuned")), metadata=mesh.md("t_b"))
    assert (
        mesh.fake.calls[-1].body["model"] == "ft:claude-test:b:001" and b.call.resolved_model == "ft:claude-test:b:001"
    )
    theirs = await _expect(
        mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params(model="b-tuned")), metadata=mesh.md("t_a")),
        grpc.StatusCode.PERMISSION_DENIED,
        "MODEL_NOT_ALLOWED",
    )
    unknown = await _expect(
        mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params(model="zz-tuned")), metadata=mesh.md("t_a")),
        grpc.StatusCode.PERMISSION_DENIED,
        "MODEL_NOT_ALLOWED",
    )
    assert theirs.details().replace("b-tuned", "X") == unknown.details().replace("zz-tuned", "X")
    listed = await mesh.stub.ListPrivateModels(pb.ListPrivateModelsRequest(), metadata=mesh.md("t_a"))
    policy = await mesh.stub.GetModelPolicy(pb.GetModelPolicyRequest(), metadata=mesh.md("t_a"))
    assert list(listed.models) == [] and list(policy.private_models) == []
    mine = await mesh.stub.ListPrivateModels(pb.ListPrivateModelsRequest(), metadata=mesh.md("t_b"))
    assert [(m.name, m.lineage) for m in mine.models] == [("b-tuned", "claude-test tuned on B's tickets")]
    await mesh.settle()
    assert [r[0] for r in await mesh.metered("t_b")] == ["ft:claude-test:b:001"]


async def test_private_endpoint_needs_and_gets_the_tenants_own_key(mesh):
    """A private model on the tenant's own endpoint is called there, with the tenant's key, never the platform's."""
    own = await FakeAnthropic().start()
    try:
        model = pb.PrivateModel(name="own", upstream_model="own-model-7", base_url=own.base_url)
        for tenant in ("t_b", "t_c"):
            await mesh.stub.RegisterPrivateModel(pb.RegisterPrivateModelRequest(model=model), metadata=mesh.md(tenant))
        await mesh.put_tenant_key("t_b", B_KEY)
        await _expect(
            mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params(model="own")), metadata=mesh.md("t_c")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "TENANT_KEY_REQUIRED",
        )
        assert own.requests == []
        await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params(model="own")), metadata=mesh.md("t_b"))
        (call,) = own.calls
        assert call.headers["authorization"] == f"Bearer {B_KEY}" and call.body["model"] == "own-model-7"
        assert mesh.fake.requests == []
    finally:
        await own.stop()


async def test_private_model_names_are_per_tenant(mesh):
    """Two tenants may use the same private model name; a duplicate within one tenant is ALREADY_EXISTS."""
    model = pb.PrivateModel(name="tuned", upstream_model="ft:1")
    for tenant in ("t_a", "t_b"):
        await mesh.stub.RegisterPrivateModel(pb.RegisterPrivateModelRequest(model=model), metadata=mesh.md(tenant))
    await _expect(
        mesh.stub.RegisterPrivateModel(pb.RegisterPrivateModelRequest(model=model), metadata=mesh.md("t_a")),
        grpc.StatusCode.ALREADY_EXISTS,
        "PRIVATE_MODEL_EXISTS",
    )


async def test_private_model_bad_input(mesh):
    """Invalid names, missing upstream ids and odd URLs: INVALID_ARGUMENT with field violations, nothing stored."""
    bad = pb.PrivateModel(name="Bad Name!", upstream_model="", base_url="ftp://x")
    err = await _expect(
        mesh.stub.RegisterPrivateModel(pb.RegisterPrivateModelRequest(model=bad), metadata=mesh.md("t_a")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PRIVATE_MODEL_INVALID",
    )
    assert set(error_details(err)["bad_request"]) == {"model.name", "model.upstream_model", "model.base_url"}
    listed = await mesh.stub.ListPrivateModels(pb.ListPrivateModelsRequest(), metadata=mesh.md("t_a"))
    assert list(listed.models) == []


async def test_list_private_models_pages(mesh):
    """ListPrivateModels pages by name with next_page_token (empty at the end)."""
    for name in ("m1", "m2", "m3"):
        await mesh.stub.RegisterPrivateModel(
            pb.RegisterPrivateModelRequest(model=pb.PrivateModel(name=name, upstream_model="ft")),
            metadata=mesh.md("t_a"),
        )
    first = await mesh.stub.ListPrivateModels(pb.ListPrivateModelsRequest(page_size=2), metadata=mesh.md("t_a"))
    second = await mesh.stub.ListPrivateModels(
        pb.ListPrivateModelsRequest(page_size=2, page_token=first.next_page_token), metadata=mesh.md("t_a")
    )
    assert [m.name for m in first.models] == ["m1", "m2"] and [m.name for m in second.models] == ["m3"]
    assert second.next_page_token == ""
    await _expect(
        mesh.stub.ListPrivateModels(pb.ListPrivateModelsRequest(page_size=-1), metadata=mesh.md("t_a")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_SIZE",
    )


async def test_policy_set_by_operator_applies_to_that_tenant_only(mesh):
    """An operator narrows A's policy: A is held to it (allowlist, alias pin, ceiling); B keeps the platform's."""
    policy = pb.ModelPolicy(
        allowed_models=["claude-other"],
        default_model="claude-other",
        pinned_versions={"claude-other": "claude-other-20250505"},
        max_tokens_ceiling=20,
    )
    set_resp = await mesh.stub.SetModelPolicy(
        pb.SetModelPolicyRequest(tenant_id="t_a", policy=policy), metadata=mesh.op()
    )
    assert list(set_resp.policy.allowed_models) == ["claude-other"]
    got = await mesh.stub.GetModelPolicy(pb.GetModelPolicyRequest(), metadata=mesh.md("t_a"))
    assert got.policy.max_tokens_ceiling == 20 and got.policy.pinned_versions["claude-other"] == "claude-other-20250505"
    await _expect(
        mesh.stub.CreateMessage(
            pb.CreateMessageRequest(params=params(model=MODEL, max_tokens=10)), metadata=mesh.md("t_a")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "MODEL_NOT_ALLOWED",
    )
    await _expect(
        mesh.stub.CreateMessage(
            pb.CreateMessageRequest(params=params(model="", max_tokens=50)), metadata=mesh.md("t_a")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "MAX_TOKENS_ABOVE_CEILING",
    )
    a = await mesh.stub.CreateMessage(
        pb.CreateMessageRequest(params=params(model="", max_tokens=10)), metadata=mesh.md("t_a")
    )
    assert a.call.resolved_model == "claude-other-20250505"
    b = await mesh.stub.GetModelPolicy(pb.GetModelPolicyRequest(), metadata=mesh.md("t_b"))
    assert MODEL in b.policy.allowed_models and b.policy.max_tokens_ceiling == 1000
    await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params(model=MODEL)), metadata=mesh.md("t_b"))


async def test_set_model_policy_is_operator_only_and_validated(mesh):
    """A tenant (even with '*') cannot set policies; an operator's invalid policy is INVALID_ARGUMENT."""
    policy = pb.ModelPolicy(allowed_models=["claude-other"])
    await _expect(
        mesh.stub.SetModelPolicy(pb.SetModelPolicyRequest(tenant_id="t_b", policy=policy), metadata=mesh.md("t_a")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await _expect(
        mesh.stub.SetModelPolicy(pb.SetModelPolicyRequest(tenant_id="t_a", policy=policy), metadata=mesh.md("t_a")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    err = await _expect(
        mesh.stub.SetModelPolicy(
            pb.SetModelPolicyRequest(
                tenant_id="t_a",
                policy=pb.ModelPolicy(allowed_models=["OK?"], default_model="other", max_tokens_ceiling=-1),
            ),
            metadata=mesh.op(),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "POLICY_INVALID",
    )
    assert set(error_details(err)["bad_request"]) == {
        "policy.allowed_models[0]",
        "policy.default_model",
        "policy.max_tokens_ceiling",
    }
    await _expect(
        mesh.stub.SetModelPolicy(pb.SetModelPolicyRequest(tenant_id="", policy=policy), metadata=mesh.op()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TENANT_ID",
    )
    for tenant in ("t_a", "t_b"):  # nothing half-written: both keep the platform policy
        got = await mesh.stub.GetModelPolicy(pb.GetModelPolicyRequest(), metadata=mesh.md(tenant))
        assert MODEL in got.policy.allowed_models and got.policy.max_tokens_ceiling == 1000


@pytest.mark.parametrize(
    "method, request_",
    [
        ("CreateMessage", pb.CreateMessageRequest(params=params())),
        ("CountTokens", pb.CountTokensRequest(params=params())),
        ("GetModelPolicy", pb.GetModelPolicyRequest()),
        ("RegisterPrivateModel", pb.RegisterPrivateModelRequest(model=pb.PrivateModel(name="x", upstream_model="y"))),
        ("ListPrivateModels", pb.ListPrivateModelsRequest()),
    ],
)
async def test_every_rpc_needs_its_scope_and_a_matching_tenant(mesh, method, request_):
    """A token without the RPC's scope is PERMISSION_DENIED; A's token presented as tenant B is refused."""
    call = getattr(mesh.stub, method)
    await _expect(
        call(request_, metadata=mesh.md("t_a", scopes=("state.threads.read",))), grpc.StatusCode.PERMISSION_DENIED
    )
    spoofed = tuple((k, "t_b" if k == "x-tenant-id" else v) for k, v in mesh.md("t_a"))
    await _expect(call(request_, metadata=spoofed), grpc.StatusCode.PERMISSION_DENIED)
    assert mesh.fake.requests == []


async def test_stream_needs_its_scope(mesh):
    """StreamMessage without inference.messages.create is refused before the upstream."""
    await _expect(
        _drain(
            mesh.stub.StreamMessage(
                pb.StreamMessageRequest(params=params()), metadata=mesh.md("t_a", scopes=("inference.policy.read",))
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert mesh.fake.requests == []


async def test_narrow_token_with_the_call_scopes_works(mesh):
    """A token with just the scopes a model call needs (and metering's) is served: no wildcard required."""
    scopes = ("inference.messages.create", "metering.budget.write", "metering.usage.write", "metering.quota.read")
    resp = await mesh.stub.CreateMessage(
        pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a", scopes=scopes)
    )
    assert resp.model == PINNED


def test_private_endpoints_must_be_https_unless_allowed():
    """A tenant's endpoint receives the tenant's key: plain http is refused unless the operator allows it."""
    from services.inference.policy import PrivateModel, check_private_model

    plain = PrivateModel("m", "ft", base_url="http://10.0.0.1:8080")
    assert "model.base_url" in check_private_model(plain)
    assert check_private_model(plain, allow_http=True) == {}
    assert check_private_model(PrivateModel("m", "ft", base_url="https://models.example.com/v1")) == {}
    assert "model.base_url" in check_private_model(PrivateModel("m", "ft", base_url="https://user@evil.example"))


@pytest.mark.parametrize("missing", ["metering.quota.read", "metering.budget.write"])
async def test_token_that_cannot_be_held_to_its_limits_is_refused(mesh, missing):
    """Without the scope to read its limits or hold budget, a call is refused, never run unlimited."""
    scopes = {"inference.messages.create", "metering.budget.write", "metering.usage.write", "metering.quota.read"}
    await _expect(
        mesh.stub.CreateMessage(
            pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_a", scopes=tuple(scopes - {missing}))
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "MISSING_SCOPE",
    )
    assert mesh.fake.requests == []
