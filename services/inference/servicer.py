"""InferenceService handlers: proto in, proxy call, proto out. Errors are raised, never set by hand."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from bulkhead.inference.v1 import inference_pb2 as pb
from bulkhead.inference.v1 import inference_pb2_grpc
from services.inference import wire
from services.inference.policy import (
    Policy,
    PrivateModel,
    check_policy,
    check_private_model,
)
from services.inference.proxy import InferenceProxy
from services.inference.store import PolicyStore
from shared import errors, paging
from shared.config_audit import ConfigAudit
from shared.ids import check_tenant_id
from shared.tenancy import acting_for, require_tenant
from shared.tiers import TierLookup

log = logging.getLogger("bulkhead.inference")
audit = logging.getLogger("bulkhead.audit")


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """The InferenceService RPCs."""

    def __init__(
        self,
        proxy: InferenceProxy,
        store: PolicyStore,
        *,
        tiers: TierLookup,
        audit: ConfigAudit,
        allow_http_endpoints: bool = False,
    ):
        """tiers: identity's word on a tenant's tier, for operator calls about another tenant."""
        self._proxy = proxy
        self._store = store
        self._tiers = tiers
        self._audit = audit
        self._allow_http = allow_http_endpoints

    async def CreateMessage(self, request: pb.CreateMessageRequest, context) -> pb.CreateMessageResponse:
        message, info = await self._proxy.create(request.params)
        response = wire.message_to_proto(message)
        response.call.CopyFrom(info.to_proto())
        return response

    async def StreamMessage(self, request: pb.StreamMessageRequest, context) -> AsyncIterator[pb.StreamMessageResponse]:
        info, events = await self._proxy.open_stream(request.params)
        first = True
        async for event in events:
            out = wire.event_to_proto(event)
            if out is None:
                continue
            if first:
                out.call.CopyFrom(info.to_proto())
                first = False
            yield out

    async def CountTokens(self, request: pb.CountTokensRequest, context) -> pb.CountTokensResponse:
        count, model = await self._proxy.count_tokens(request.params)
        return pb.CountTokensResponse(input_tokens=count, resolved_model=model)

    async def GetModelPolicy(self, request: pb.GetModelPolicyRequest, context) -> pb.GetModelPolicyResponse:
        policy, private = await self._proxy.effective_policy()
        return pb.GetModelPolicyResponse(
            policy=_policy_proto(policy), private_models=[_private_proto(m) for m in private.values()]
        )

    async def SetModelPolicy(self, request: pb.SetModelPolicyRequest, context) -> pb.SetModelPolicyResponse:
        operator = require_tenant()
        if not operator.is_operator:  # the interceptor checked the scope; this is defence in depth
            raise errors.PermissionDenied("operators only", reason="OPERATOR_ONLY")
        tenant_id = check_tenant_id(request.tenant_id)
        p = request.policy
        policy = Policy(tuple(p.allowed_models), p.default_model, dict(p.pinned_versions), p.max_tokens_ceiling)
        problems = check_policy(policy)
        if problems:
            raise errors.InvalidArgument("invalid policy", reason="POLICY_INVALID", violations=problems)
        # The tenant's tier says where its own calls read the policy; only identity knows it here.
        tier = await self._tiers.tier_of(tenant_id)
        async with self._audit.change(
            "model_policy.set",
            tenant_id=tenant_id,
            tier=tier,
            target=f"model_policy/{tenant_id}",
            tables={"inference_policies"},
            detail={
                "allowed_models": p.allowed_models,
                "default_model": p.default_model,
                "pinned_versions": [f"{k}={v}" for k, v in p.pinned_versions.items()],
                "max_tokens_ceiling": p.max_tokens_ceiling,
            },
        ):
            with acting_for(tenant_id, tier=tier):
                await self._store.put_policy(policy)
        with acting_for(tenant_id, tier=tier):
            self._proxy.forget_policy(tenant_id)
            effective, _ = await self._proxy.effective_policy()
        audit.info("model policy set", extra={"target_tenant": tenant_id, "operator": operator.principal_id})
        return pb.SetModelPolicyResponse(policy=_policy_proto(effective))

    async def RegisterPrivateModel(
        self, request: pb.RegisterPrivateModelRequest, context
    ) -> pb.RegisterPrivateModelResponse:
        m = request.model
        model = PrivateModel(m.name, m.upstream_model, m.base_url, m.lineage)
        problems = check_private_model(model, allow_http=self._allow_http)
        if problems:
            raise errors.InvalidArgument("invalid private model", reason="PRIVATE_MODEL_INVALID", violations=problems)
        endpoint = urlsplit(model.base_url)
        async with self._audit.change_own(
            "private_model.register",
            target=f"private_model/{model.name}",
            tables={"inference_private_models"},
            detail={
                "upstream_model": model.upstream_model,
                "lineage": model.lineage,
                "endpoint": f"{endpoint.scheme}://{endpoint.hostname or ''}",
            },
        ):
            stored = await self._store.add_private_model(model)
            if stored is None:
                raise errors.AlreadyExists(
                    f"a private model named {model.name!r} exists", reason="PRIVATE_MODEL_EXISTS"
                )
        self._proxy.forget_policy(require_tenant().tenant_id)
        return pb.RegisterPrivateModelResponse(model=_private_proto(stored))

    async def ListPrivateModels(self, request: pb.ListPrivateModelsRequest, context) -> pb.ListPrivateModelsResponse:
        size = paging.page_size(request.page_size)
        after = paging.decode(request.page_token) or ""
        if not isinstance(after, str):
            raise paging.invalid_token()
        page = paging.keyset(await self._store.list_private_models(after=after, limit=size + 1), size, lambda m: m.name)
        return pb.ListPrivateModelsResponse(
            models=[_private_proto(m) for m in page.items], next_page_token=page.next_page_token
        )


def _policy_proto(p: Policy) -> pb.ModelPolicy:
    return pb.ModelPolicy(
        allowed_models=list(p.allowed_models),
        default_model=p.default_model,
        pinned_versions=p.pinned_versions,
        max_tokens_ceiling=p.max_tokens_ceiling,
    )


def _private_proto(m: PrivateModel) -> pb.PrivateModel:
    return pb.PrivateModel(
        name=m.name, upstream_model=m.upstream_model, base_url=m.base_url, lineage=m.lineage, create_time=m.create_time
    )
