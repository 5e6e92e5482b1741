"""A malformed scope is echoed clipped: the error details stay within the 1 KB trailer (found by the
isolation fuzzer: CreatePrincipal with a 1500-character scope answered 1249 bytes of details)."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.identity.v1 import identity_pb2 as pb
from shared.errors import MAX_DETAILS_BYTES, error_details

# The error message is clipped to 400 characters elsewhere, so 3-byte characters are what overflowed 1 KB.
SCOPES = ["\u0ae0" * 1500, "\U000e0001" * 300, "x " * 2500]  # 3-byte chars, unprintable (repr grows 10x), long


async def _refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def _details_bytes(err: grpc.aio.AioRpcError) -> int:
    return len(next((v for k, v in err.trailing_metadata() or () if k == "grpc-status-details-bin"), b""))


@pytest.mark.parametrize("scope", SCOPES, ids=["3-byte", "unprintable", "long"])
async def test_a_malformed_scope_gets_small_precise_details(sqlite_identity, scope):
    """CreatePrincipal, CreateApiKey, IssueToken and ExchangeToken: INVALID_ARGUMENT naming scopes, details <= 1 KB."""
    harness = sqlite_identity
    tenant = await harness.tenant("scope-echo")
    principal = (
        await harness.stub.CreatePrincipal(
            pb.CreatePrincipalRequest(kind=pb.PRINCIPAL_KIND_SERVICE_ACCOUNT, display_name="bot", scopes=["state.*"]),
            metadata=tenant.metadata,
        )
    ).principal
    calls = [
        harness.stub.CreatePrincipal(
            pb.CreatePrincipalRequest(kind=pb.PRINCIPAL_KIND_SERVICE_ACCOUNT, display_name="bot2", scopes=[scope]),
            metadata=tenant.metadata,
        ),
        harness.stub.CreateApiKey(
            pb.CreateApiKeyRequest(principal_id=principal.id, scopes=[scope]), metadata=tenant.metadata
        ),
        harness.stub.IssueToken(pb.IssueTokenRequest(api_key=tenant.api_key, scopes=[scope])),
        harness.stub.ExchangeToken(pb.ExchangeTokenRequest(scopes=[scope]), metadata=tenant.metadata),
    ]
    for call in calls:
        err = await _refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "scopes" in error_details(err)["bad_request"]
        assert _details_bytes(err) <= MAX_DETAILS_BYTES, _details_bytes(err)
