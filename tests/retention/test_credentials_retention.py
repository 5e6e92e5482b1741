"""Retention of the credentials access audit (AuditLog.prune): a tenant's access events older than its
audit retention are pruned, the chain's anchor moves to the last pruned one and VerifyAccessEvents still
verifies from it; a tenant with a long retention keeps all; removing a kept event or tampering with the
anchor is caught. SQLite and Postgres; pooled, bridge, silo."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from services.credentials.audit import ALLOWED, AuditLog, hashed_fields
from services.credentials.server import MIGRATIONS
from services.credentials.store import AuditRow
from shared import audit_chain
from shared.db import Database
from shared.db.raw import raw_transaction
from shared.retention import DAY_US, Policy, RetentionSweeper
from shared.tenancy import TenantContext, tenant_scope
from testkit.dialects import DIALECTS, open_migrated

KEY = b"k" * 32


@pytest.fixture(params=DIALECTS)
async def db(request, tmp_path):
    database = await open_migrated(request, tmp_path, MIGRATIONS, "cred_ret")
    yield database
    await database.close()


def _ctx(tier: str) -> TenantContext:
    return TenantContext(
        tenant_id=f"t_{uuid.uuid4().hex[:12]}", principal_id="p_admin", tier=tier, request_id=uuid.uuid4().hex
    )


async def _sql(db: Database, ctx: TenantContext, sql: str, *args) -> int:
    route = await db.router.existing(ctx.tenant_id, ctx.tier)
    async with raw_transaction(route.bind, tenant_id=ctx.tenant_id, schema=route.schema, write=True) as tx:
        return await tx.execute(sql, ctx.tenant_id, *args)


async def _events(audit: AuditLog, ctx: TenantContext, n: int, backdate: int = 0, days: int = 0) -> None:
    """n access events; the first `backdate` re-dated `days` ago and the chain re-linked with the key."""
    with tenant_scope(ctx):
        for i in range(n):
            await audit.record("get", ALLOWED, secret_name=f"s{i}", version=1)
        if not backdate:
            return
        rows = await audit.page(after_seq=0, limit=1000)
    prev, then = audit_chain.GENESIS, time.time_ns() // 1000 - days * DAY_US
    for row in rows:
        if row.seq <= backdate:
            row.time_us = then + row.seq
        digest = audit_chain.link(prev, hashed_fields(row), KEY)
        await _sql(
            audit._db,
            ctx,
            "UPDATE cred_audit_events SET time_us = $2, prev_hash = $3, hash = $4 WHERE tenant_id = $1 AND seq = $5",
            row.time_us,
            prev,
            digest,
            row.seq,
        )
        prev = digest
    await _sql(audit._db, ctx, "UPDATE cred_audit_heads SET hash = $2 WHERE tenant_id = $1", prev)
    audit._heads.pop(ctx.tenant_id, None)
    with tenant_scope(ctx):
        assert (await audit.verify()).intact


def _sweeper(audit: AuditLog, *policies: Policy) -> RetentionSweeper:
    async def source():
        for p in policies:
            yield p

    return RetentionSweeper("credentials", source, [audit.prune])


async def _seqs(audit: AuditLog, ctx: TenantContext) -> list[int]:
    with tenant_scope(ctx):
        return [r.seq for r in await audit.page(after_seq=0, limit=1000)]


@pytest.mark.parametrize("tier", ["pooled", "bridge", "silo"])
async def test_prunes_old_access_events_of_one_tenant_and_verifies_from_the_anchor(db, tier):
    audit = AuditLog(db, KEY)
    try:
        short, keep = _ctx(tier), _ctx(tier)
        for ctx in (short, keep):
            await _events(audit, ctx, 6, backdate=3, days=3)
        with tenant_scope(short):
            third = (await audit.page(after_seq=2, limit=1))[0]
        sweeper = _sweeper(
            audit, Policy(short.tenant_id, tier, audit_days=1), Policy(keep.tenant_id, tier, audit_days=30)
        )
        assert await sweeper.run_once() == 3
        assert await sweeper.run_once() == 0
        assert await _seqs(audit, short) == [4, 5, 6] and await _seqs(audit, keep) == [1, 2, 3, 4, 5, 6]
        with tenant_scope(short):
            report, anchor = await audit.verify_anchored()
            assert report.intact and report.checked == 3
            assert (anchor.sequence, anchor.hash, anchor.time_us) == (3, third.hash, third.time_us)
            await audit.record("get", ALLOWED, secret_name="after")  # the chain goes on
            assert (await audit.verify()).intact and (await _seqs(audit, short))[-1] == 7
        with tenant_scope(keep):
            report, anchor = await audit.verify_anchored()
            assert report.intact and report.checked == 6 and anchor.sequence == 0
    finally:
        await audit.close()


@pytest.mark.parametrize(
    ("sql", "args", "bad", "words"),
    [
        ("DELETE FROM cred_audit_events WHERE tenant_id = $1 AND seq = 5", (), 5, "missing"),
        ("DELETE FROM cred_audit_events WHERE tenant_id = $1 AND seq = 4", (), 4, "missing"),
        ("UPDATE cred_audit_heads SET anchor_hash = $2 WHERE tenant_id = $1", ("e" * 64,), 4, "does not link"),
        ("UPDATE cred_audit_heads SET anchor_seq = 4 WHERE tenant_id = $1", (), 5, "does not link"),
    ],
)
async def test_tampering_after_pruning_is_caught(db, sql, args, bad, words):
    audit = AuditLog(db, KEY)
    try:
        ctx = _ctx("pooled")
        await _events(audit, ctx, 6, backdate=3, days=2)
        assert await _sweeper(audit, Policy(ctx.tenant_id, "pooled", audit_days=1)).run_once() == 3
        assert await _sql(db, ctx, sql, *args) == 1
        with tenant_scope(ctx):
            report = await audit.verify()
        assert not report.intact and report.first_bad_sequence == bad and words in report.problem, report
    finally:
        await audit.close()


async def test_pruning_while_appending_keeps_one_intact_chain(db):
    """Appends and three sweepers at once: every old event pruned once, the new ones chained after."""
    audit = AuditLog(db, KEY)
    try:
        ctx = _ctx("pooled")
        await _events(audit, ctx, 20, backdate=15, days=2)
        policy = Policy(ctx.tenant_id, "pooled", audit_days=1)
        now = time.time_ns() // 1000

        async def append():
            with tenant_scope(ctx):
                for i in range(10):
                    await audit.record("get", ALLOWED, secret_name=f"n{i}")

        results = await asyncio.gather(append(), *(audit.prune(policy, now, batch=4) for _ in range(3)))
        assert sum(results[1:]) == 15
        assert await _seqs(audit, ctx) == list(range(16, 31))
        with tenant_scope(ctx):
            report, anchor = await audit.verify_anchored()
        assert report.intact and anchor.sequence == 15
    finally:
        await audit.close()


def test_row_model_has_the_anchor():
    assert {"anchor_seq", "anchor_hash", "anchor_time_us"} <= set(AuditRow.metadata.tables["cred_audit_heads"].c.keys())
