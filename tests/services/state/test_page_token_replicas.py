"""A page token one state replica issued continues on another replica and after a restart."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.state.v1 import state_pb2 as st
from bulkhead.state.v1 import state_pb2_grpc
from services.state.envelope import PlaintextEnvelope
from services.state.server import MIGRATIONS, serve_state
from shared.db import Database
from testkit.tokens import TestTokens


async def _open(backend: str, request, tmp_path) -> tuple[str, str | None]:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'state.db'}", None
    urls = await request.getfixturevalue("postgres").create_database("paging_replicas")
    return urls.app_url, urls.owner_url


async def _list(server, md, token: str = "") -> st.ListThreadsResponse:
    async with grpc.aio.insecure_channel(server.address) as channel:
        return await state_pb2_grpc.StateServiceStub(channel).ListThreads(
            st.ListThreadsRequest(page_size=2, page_token=token), metadata=md
        )


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_page_token_continues_on_another_replica_and_after_a_restart(backend, request, tmp_path):
    """Replicas open the database on their own; the one key they read makes any replica's token good on all."""
    url, owner = await _open(backend, request, tmp_path)
    tokens = TestTokens()
    md = tokens.metadata("t_pager")
    dbs = [await Database.open(url, owner_url=owner, migrations=str(MIGRATIONS)) for _ in range(2)]
    first, second = [await serve_state(db=db, envelope=PlaintextEnvelope(), verifier=tokens.verifier) for db in dbs]
    try:
        # (in one process an unset key would also agree: say the key came from the database)
        assert first.interceptor.page_key and first.interceptor.page_key == second.interceptor.page_key
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = state_pb2_grpc.StateServiceStub(channel)
            for i in range(5):
                await stub.CreateThread(st.CreateThreadRequest(thread_id=f"th-{i}"), metadata=md)
        page = await _list(first, md)
        rest = await _list(second, md, page.next_page_token)
        assert [t.thread_id for t in (*page.threads, *rest.threads)] == ["th-0", "th-1", "th-2", "th-3"]
    finally:
        await first.stop(0)
        await second.stop(0)
        for db in dbs:
            await db.close()
    db = await Database.open(url, owner_url=owner, migrations=str(MIGRATIONS))  # the service restarted
    restarted = await serve_state(db=db, envelope=PlaintextEnvelope(), verifier=tokens.verifier)
    try:
        assert restarted.interceptor.page_key == first.interceptor.page_key
        last = await _list(restarted, md, rest.next_page_token)
        assert [t.thread_id for t in last.threads] == ["th-4"] and last.next_page_token == ""
    finally:
        await restarted.stop(0)
        await db.close()
