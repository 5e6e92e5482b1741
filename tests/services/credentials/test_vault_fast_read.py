"""GetSecret's lean KV v2 read on a kept-alive connection (services/credentials/vault_read.py), against
a real OpenBao: it answers plain reads, OpenBao still enforces the tenant's policy on it, and every
other case goes through the hvac path unchanged."""

from __future__ import annotations

import asyncio

import grpc

from bulkhead.credentials.v1 import credentials_pb2 as pb
from services.credentials.backend import TenantRef
from tests.services.credentials.conftest import expect_error


async def test_reads_take_the_lean_path_and_reuse_one_connection(vh):
    """Repeated reads are answered by the lean reader over one kept connection, versions included."""
    await vh.put("lean", b"lean-value-1")
    await vh.put("lean", b"lean-value-2")
    reader = vh.service.backend._reader
    before = reader.reads
    for _ in range(5):
        assert (await vh.get("lean")).value == b"lean-value-2"
    assert (await vh.get("lean", version=1)).value == b"lean-value-1"
    assert reader.reads - before >= 5  # the first read after a put may mint the token on the hvac path
    assert sum(len(c) for c in reader._idle.values()) == 1


async def test_a_silo_tenant_reads_in_its_namespace(vh):
    """The lean read sends the silo tenant's namespace; its value comes back from there."""
    silo = TenantRef(vh.alpha, "silo")
    backend = vh.service.backend
    version = await backend.write(silo, "ns", b"silo-value", cas=None)
    before = backend._reader.reads
    assert (await backend.read(silo, "ns", version)).value == b"silo-value"
    assert backend._reader.reads == before + 1


async def test_openbao_refuses_another_tenants_path_on_the_lean_read(vh):
    """Alpha's token asking for beta's KV path gets nothing from the lean reader (OpenBao says 403)."""
    await vh.put("db", b"alpha-db-value")
    await vh.put("db", b"beta-db-value", tenant=vh.beta)
    backend = vh.service.backend
    beta_path = backend.layout.secret_path(TenantRef(vh.beta), "db")
    assert backend.tokens.cached_token(TenantRef(vh.alpha)) is not None
    assert await backend._reader.read(TenantRef(vh.alpha), beta_path, 1) is None
    assert (await vh.get("db")).value == b"alpha-db-value"


async def test_missing_and_deleted_versions_still_fail_as_before(vh):
    """404s fall through to hvac, which reports them: a deleted secret and an unknown version are NOT_FOUND."""
    await vh.put("gone", b"gone-value")
    await expect_error(grpc.StatusCode.NOT_FOUND, vh.get("gone", version=7))
    await vh.stub.DeleteSecret(pb.DeleteSecretRequest(name="gone"), metadata=vh.md())
    await expect_error(grpc.StatusCode.NOT_FOUND, vh.get("gone"))


async def test_a_connection_closed_while_idle_is_replaced(vh):
    """OpenBao closing a kept connection between reads costs a new connection, not a failed read."""
    await vh.put("idle", b"idle-value")
    await vh.get("idle")
    reader = vh.service.backend._reader
    for conns in reader._idle.values():
        for _stream, writer in conns:
            writer.transport.abort()
    await asyncio.sleep(0.05)
    before = reader.reads
    assert (await vh.get("idle")).value == b"idle-value"
    assert reader.reads == before + 1


async def test_no_token_yet_goes_through_hvac_which_mints_it(vh):
    """Without a minted token the lean reader never provisions (it runs on the loop): hvac does."""
    await vh.put("fresh", b"fresh-value")
    tokens = vh.service.backend.tokens
    tokens.forget(TenantRef(vh.alpha))
    assert tokens.cached_token(TenantRef(vh.alpha)) is None
    minted = tokens.minted_count
    assert (await vh.get("fresh")).value == b"fresh-value"
    assert tokens.minted_count == minted + 1 and tokens.cached_token(TenantRef(vh.alpha)) is not None


async def test_a_large_value_reads_whole_whichever_path_answers(vh):
    """A value near the 64 KiB limit (OpenBao may answer it chunked, which only hvac reads) comes back
    whole, and the next small read still takes the lean path."""
    big = bytes(range(256)) * 250
    await vh.put("big", big)
    await vh.put("small", b"small-value")
    await vh.get("small")
    assert (await vh.get("big")).value == big
    reader = vh.service.backend._reader
    before = reader.reads
    assert (await vh.get("small")).value == b"small-value"
    assert reader.reads == before + 1
