"""services.orchestrator.injection: secrets resolved for one tool call, kept out of logs, reprs and exceptions."""

from __future__ import annotations

import traceback

import grpc
import pytest

from services.orchestrator.injection import (
    SecretInjector,
    SecretRef,
    SecretResolutionError,
    ToolFailed,
)
from shared import errors
from shared.client import make_channel
from shared.logs import REDACTED, scrub
from shared.tenancy import TenantContext, tenant_scope
from testkit.procs import free_port


def _as(h, tenant: str, scopes=("credentials.secrets.read",)) -> TenantContext:
    """The context an orchestrator has while running a tool for `tenant` (token with read scope)."""
    token = h.tokens.mint(tenant, scopes)
    return TenantContext(tenant, "p_agent", frozenset(scopes), token=token)


async def test_tool_gets_the_values_it_references(lh):
    """Each reference is resolved, pinned versions included, under the names the tool expects."""
    await lh.put("stripe-key", b"sk_live_first")
    await lh.put("stripe-key", b"sk_live_second")
    await lh.put("db-url", b"postgres://u:pw@db/x")
    channel = make_channel(lh.service.running.address, forward=True)
    try:
        with tenant_scope(_as(lh, lh.alpha)):
            async with SecretInjector(channel).inject(
                {"STRIPE": "stripe-key", "OLD_STRIPE": SecretRef("stripe-key", 1), "DB": "db-url"}
            ) as env:
                assert env.reveal() == {
                    "STRIPE": "sk_live_second",
                    "OLD_STRIPE": "sk_live_first",
                    "DB": "postgres://u:pw@db/x",
                }
                assert "sk_live" not in repr(env) and "sk_live" not in str(env)
            assert len(env) == 0  # dropped after the call
    finally:
        await channel.close()


async def test_a_failing_tool_error_is_redacted_and_unchained(lh, caplog):
    """The tool's exception leaves as ToolFailed with values redacted and no original attached."""
    await lh.put("api-token", b"tok-9f8e7d6c5b")
    channel = make_channel(lh.service.running.address, forward=True)
    try:
        with tenant_scope(_as(lh, lh.alpha)), pytest.raises(ToolFailed) as info:
            async with SecretInjector(channel).inject({"TOKEN": "api-token"}) as env:
                raise RuntimeError(f"upstream refused {env['TOKEN']}")
    finally:
        await channel.close()
    err = info.value
    assert str(err) == f"RuntimeError: upstream refused {REDACTED}" and err.original_type == "RuntimeError"
    assert err.__cause__ is None and err.__suppress_context__
    assert err.__context__ is None or (err.__context__.args == () and err.__context__.__traceback__ is None)
    assert "tok-9f8e7d6c5b" not in "".join(traceback.format_exception(err))
    assert scrub("log line with tok-9f8e7d6c5b inside") == f"log line with {REDACTED} inside"


async def test_missing_or_foreign_secrets_fail_by_reference(lh):
    """A reference to another tenant's secret fails like a missing one, naming only the reference."""
    await lh.put("alpha-only", b"alpha-value-xyz")
    channel = make_channel(lh.service.running.address, forward=True)
    try:
        with tenant_scope(_as(lh, lh.beta)):
            with pytest.raises(SecretResolutionError) as info:
                async with SecretInjector(channel).inject({"KEY": "alpha-only"}):
                    raise AssertionError("the tool must not run")
    finally:
        await channel.close()
    assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.reason == "SECRET_NOT_FOUND"
    assert "alpha-value" not in str(info.value)


async def test_without_the_read_scope_nothing_is_injected(lh):
    """A token without credentials.secrets.read cannot resolve anything."""
    await lh.put("k", b"some-value")
    channel = make_channel(lh.service.running.address, forward=True)
    try:
        with tenant_scope(_as(lh, lh.alpha, scopes=("credentials.secrets.describe",))):
            with pytest.raises(SecretResolutionError) as info:
                await SecretInjector(channel).resolve({"K": "k"})
    finally:
        await channel.close()
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_credentials_service_that_does_not_answer_is_unavailable_not_a_bad_reference(lh):
    """Nothing listening: Unavailable (the orchestrator gives the run back and retries the step), never a
    SecretResolutionError, which a tool step reports to the model as a missing credential."""
    channel = make_channel(f"127.0.0.1:{free_port()}", forward=True)
    try:
        with tenant_scope(_as(lh, lh.alpha)), pytest.raises(errors.Unavailable):
            await SecretInjector(channel, timeout=2.0).resolve({"K": "k"})
    finally:
        await channel.close()
