"""Credentials rides out its own audit-chain races: an append that loses to another replica rereads the head
and retries within a time budget, so GetSecret never answers ABORTED for it and callers hold no retry loop."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from bulkhead.credentials.v1 import credentials_pb2 as pb
from bulkhead.credentials.v1 import credentials_pb2_grpc
from services.credentials import audit as audit_mod
from services.credentials import store
from services.credentials.audit import AuditLog
from services.credentials.server import MIGRATIONS, serve_credentials
from shared import errors
from shared.client import make_channel
from shared.db import Database
from shared.tenancy import TenantContext, tenant_scope
from tests.services.credentials.conftest import AUDIT_KEY, TOKENS, make_test_backend, new_tenant, open_db

REPLICAS, CALLERS = 3, 90


def _head_moves(monkeypatch, times: int) -> list[int]:
    """The first `times` SQLite appends find the head moved (as if another replica committed first)."""
    lost = [0]
    real = store.sqlite_append_audit

    def racing(conn, tenant_id, rows, *, head_seq):
        if lost[0] < times:
            lost[0] += 1
            return False
        return real(conn, tenant_id, rows, head_seq=head_seq)

    monkeypatch.setattr(store, "sqlite_append_audit", racing)
    return lost


async def test_an_append_outlasts_many_lost_races(tmp_path, migrated_template, monkeypatch):
    """Eight lost races in a row (the old loop gave up after five, answering ABORTED): the event is
    still written once, and the chain verifies."""
    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, AUDIT_KEY)
    lost = _head_moves(monkeypatch, 8)
    try:
        with tenant_scope(TenantContext(new_tenant("c"), "p_test", request_id="r")):
            await log.record("get", "allowed", secret_name="s")
            rows = await log.page(after_seq=0, limit=10)
            report = await log.verify()
        assert lost == [8]
        assert [(r.seq, r.secret_name) for r in rows] == [(1, "s")] and report.intact
    finally:
        await log.close()
        await db.close()


async def test_an_append_that_never_wins_is_unavailable_not_aborted(tmp_path, migrated_template, monkeypatch):
    """Past the budget the call fails UNAVAILABLE with a retry delay (a channel resends an idempotent
    read after it), never ABORTED (which would ask every caller for a loop of its own)."""
    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, AUDIT_KEY)
    _head_moves(monkeypatch, 10**9)
    monkeypatch.setattr(audit_mod, "APPEND_BUDGET_S", 0.05)
    try:
        with tenant_scope(TenantContext(new_tenant("c"), "p_test", request_id="r")):
            with pytest.raises(errors.Unavailable) as info:
                await log.record("get", "allowed", secret_name="s")
        assert info.value.reason == "AUDIT_CONTENTION" and info.value.retry_after
    finally:
        await log.close()
        await db.close()


def _count_lost_races(monkeypatch) -> list[int]:
    """Counts appends that found the head moved by another replica (SQLite and Postgres)."""
    lost = [0]
    real_sqlite, real_raw = store.sqlite_append_audit, store.raw_append_audit

    def sqlite(conn, tenant_id, rows, *, head_seq):
        try:
            won = real_sqlite(conn, tenant_id, rows, head_seq=head_seq)
        except Exception as exc:
            lost[0] += store.is_unique_violation(exc)  # its sequence numbers were taken meanwhile
            raise
        lost[0] += not won
        return won

    async def raw(tx, tenant_id, rows, *, head_seq):
        try:
            won = await real_raw(tx, tenant_id, rows, head_seq=head_seq)
        except Exception as exc:
            lost[0] += store.is_unique_violation(exc)
            raise
        lost[0] += not won
        return won

    monkeypatch.setattr(store, "sqlite_append_audit", sqlite)
    monkeypatch.setattr(store, "raw_append_audit", raw)
    return lost


async def _many_callers_read_one_secret(
    databases: list[Database], tmp_path, lost: list[int], kind: str = "local", openbao=None
) -> None:
    """REPLICAS credentials servers on one database; CALLERS concurrent GetSecret of one secret over plain
    stubs (no loop of their own): every read succeeds, each is audited once, and the chain verifies."""
    services, channels = [], []
    tenant = new_tenant("c")
    md = TOKENS.metadata(tenant, ("*",))
    try:
        for db in databases:
            backend = make_test_backend(kind, db, tmp_path, openbao)
            services.append(
                await serve_credentials(db=db, backend=backend, verifier=TOKENS.verifier, audit_key=AUDIT_KEY)
            )
            channels.append(make_channel(services[-1].running.address))
        stubs = [credentials_pb2_grpc.CredentialsServiceStub(c) for c in channels]
        await stubs[0].PutSecret(pb.PutSecretRequest(name="shared", value=b"v1"), metadata=md)
        for round_ in range(3):  # a few rounds: the replicas' cached heads go stale between them
            replies = await asyncio.gather(
                *(
                    stubs[i % REPLICAS].GetSecret(pb.GetSecretRequest(name="shared"), metadata=md)
                    for i in range(CALLERS)
                ),
                return_exceptions=True,
            )
            failures = [r for r in replies if isinstance(r, grpc.aio.AioRpcError)]
            assert not failures, (round_, {(f.code(), f.details()) for f in failures})
            assert {r.value for r in replies} == {b"v1"}
        events = await stubs[1].ListAccessEvents(pb.ListAccessEventsRequest(page_size=1000), metadata=md)
        assert sum(e.action == pb.ACCESS_ACTION_GET for e in events.events) == 3 * CALLERS
        report = await stubs[2].VerifyAccessEvents(pb.VerifyAccessEventsRequest(), metadata=md)
        assert report.intact and report.events_checked == 3 * CALLERS + 1
        assert lost[0] > 0  # the replicas did race for the head (else this test proves nothing)
    finally:
        for channel in channels:
            await channel.close()
        for service in services:
            with contextlib.suppress(Exception):
                await service.stop(grace=0.5)


async def test_concurrent_reads_on_several_replicas_all_succeed_sqlite(tmp_path, migrated_template, monkeypatch):
    lost = _count_lost_races(monkeypatch)
    first = await open_db(tmp_path, migrated_template)
    path = first.engine.url.database
    others = [await Database.open(f"sqlite+aiosqlite:///{path}", migrations=MIGRATIONS) for _ in range(REPLICAS - 1)]
    await _many_callers_read_one_secret([first, *others], tmp_path, lost)


@pytest.mark.parametrize("kind", ["local", "vault"])
async def test_concurrent_reads_on_several_replicas_all_succeed_postgres(
    postgres, tmp_path, monkeypatch, request, kind
):
    """The production shape: the audit chain on Postgres, the values in the local backend or in OpenBao."""
    openbao = request.getfixturevalue("openbao") if kind == "vault" else None
    lost = _count_lost_races(monkeypatch)
    urls = await postgres.create_database(f"credentials_contention_{kind}")
    databases = [
        await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url) for _ in range(REPLICAS)
    ]
    await _many_callers_read_one_secret(databases, tmp_path, lost, kind, openbao)
