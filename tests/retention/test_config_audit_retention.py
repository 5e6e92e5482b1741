"""Retention of the configuration audit (shared.config_audit.prune, shared.retention): a tenant's
events older than its audit retention are pruned oldest first, the chain's anchor moves to the last
pruned event and the chain still verifies from it; another tenant keeps everything; a removed kept
event or a tampered anchor is still caught. SQLite and Postgres, pooled, bridge and silo."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from services.inference.policy import Policy as ModelPolicy
from services.inference.server import MIGRATIONS
from services.inference.store import PolicyStore
from shared.audit_chain import GENESIS, link
from shared.config_audit import ConfigAudit, _hashed
from shared.db import Database
from shared.db.raw import raw_transaction
from shared.retention import DAY_US, Policy, RetentionSweeper
from shared.tenancy import TenantContext, tenant_scope
from testkit.dialects import DIALECTS, open_migrated

EVENTS = "inference_config_audit_events"
HEADS = "inference_config_audit_heads"


@pytest.fixture(params=DIALECTS)
async def db(request, tmp_path) -> AsyncIterator[Database]:
    database = await open_migrated(request, tmp_path, MIGRATIONS, "ret")
    yield database
    await database.close()


def _tenant(tier: str) -> TenantContext:
    return TenantContext(
        tenant_id=f"t_{uuid.uuid4().hex[:12]}", principal_id="p_admin", tier=tier, request_id=uuid.uuid4().hex
    )


async def _changes(audit: ConfigAudit, store: PolicyStore, ctx: TenantContext, n: int) -> None:
    for i in range(n):
        with tenant_scope(ctx):
            async with audit.change_own(
                "model_policy.set",
                target=f"model_policy/{ctx.tenant_id}",
                tables={"inference_policies"},
                detail={"max_tokens_ceiling": 100 + i},
            ):
                await store.put_policy(ModelPolicy(("claude-test",), "claude-test", {}, 100 + i))


async def _sql(db: Database, ctx: TenantContext, sql: str, *args) -> int:
    """A statement on the tenant's own store (its schema or database), bypassing the audit's code."""
    route = await db.router.existing(ctx.tenant_id, ctx.tier)
    async with raw_transaction(route.bind, tenant_id=ctx.tenant_id, schema=route.schema, write=True) as tx:
        return await tx.execute(sql, ctx.tenant_id, *args)


async def _backdate(audit: ConfigAudit, ctx: TenantContext, up_to: int, days: int) -> None:
    """Make events 1..up_to look written `days` ago: their time moved back and the chain re-linked with
    the audit's key, as if they had been appended then (the time is hashed)."""
    db, then = audit._db, time.time_ns() // 1000 - days * DAY_US
    rows = await audit.events(ctx.tenant_id, ctx.tier, after=None, limit=1000, newest_first=False)
    prev = GENESIS
    for row in rows:
        if row["seq"] <= up_to:
            row["time_us"] = then + row["seq"]
        digest = link(prev, _hashed(row), audit._key)
        await _sql(
            db,
            ctx,
            f"UPDATE {audit.events_table} SET time_us = $2, prev_hash = $3, hash = $4 "
            "WHERE tenant_id = $1 AND seq = $5",
            row["time_us"],
            prev,
            digest,
            row["seq"],
        )
        prev = digest
    assert await _sql(db, ctx, f"UPDATE {audit.heads_table} SET hash = $2 WHERE tenant_id = $1", prev) == 1
    assert (await audit.verify(ctx.tenant_id, ctx.tier))[0].intact


def _sweeper(*policies: Policy, audit: ConfigAudit) -> RetentionSweeper:
    async def source():
        for p in policies:
            yield p

    return RetentionSweeper("inference", source, [audit.prune])


async def _seqs(audit: ConfigAudit, ctx: TenantContext) -> list[int]:
    return [r["seq"] for r in await audit.events(ctx.tenant_id, ctx.tier, after=None, limit=100, newest_first=False)]


@pytest.mark.parametrize("tier", ["pooled", "bridge", "silo"])
async def test_prunes_only_old_events_of_the_short_retention_tenant_and_verifies_from_the_anchor(db, tier):
    """Hashes are HMACs here (a key), as deployments with BULKHEAD_<SVC>_CONFIG_AUDIT_KEY run."""
    audit, store = ConfigAudit("inference", db, key=b"k" * 32), PolicyStore(db)
    short, long_ = _tenant(tier), _tenant(tier)
    for ctx in (short, long_):
        await _changes(audit, store, ctx, 6)
        await _backdate(audit, ctx, 3, days=3)  # events 1..3 written three days ago
    before = await audit.events(short.tenant_id, tier, after=None, limit=100, newest_first=False)
    sweeper = _sweeper(
        Policy(short.tenant_id, tier, audit_days=1), Policy(long_.tenant_id, tier, audit_days=30), audit=audit
    )

    assert await sweeper.run_once() == 3
    assert await _seqs(audit, short) == [4, 5, 6]
    assert await _seqs(audit, long_) == [1, 2, 3, 4, 5, 6]
    report, head, anchor = await audit.verify_anchored(short.tenant_id, tier)
    assert report.intact and report.checked == 3, report
    assert (anchor.sequence, anchor.hash, anchor.time_us) == (3, before[2]["hash"], before[2]["time_us"])
    assert head == (6, before[5]["hash"])
    assert (await audit.verify_anchored(long_.tenant_id, tier))[2].sequence == 0
    assert (await audit.verify(long_.tenant_id, tier))[0].checked == 6

    assert await sweeper.run_once() == 0  # a repeat does nothing
    await _changes(audit, store, short, 1)  # the chain goes on after the anchor
    report, head, _ = await audit.verify_anchored(short.tenant_id, tier)
    assert report.intact and head[0] == 7


@pytest.mark.parametrize(
    "tamper", ["delete_kept_middle", "delete_oldest_kept", "anchor_hash", "anchor_back", "anchor_forward"]
)
async def test_tampering_after_pruning_is_still_caught(db, tamper):
    audit, store = ConfigAudit("inference", db, key=b"k" * 32), PolicyStore(db)
    ctx = _tenant("pooled")
    await _changes(audit, store, ctx, 6)
    await _backdate(audit, ctx, 2, days=5)
    assert await _sweeper(Policy(ctx.tenant_id, "pooled", audit_days=1), audit=audit).run_once() == 2
    assert (await audit.verify(ctx.tenant_id, "pooled"))[0].intact
    statements = {
        "delete_kept_middle": (f"DELETE FROM {EVENTS} WHERE tenant_id = $1 AND seq = 4", (), 4, "missing"),
        "delete_oldest_kept": (f"DELETE FROM {EVENTS} WHERE tenant_id = $1 AND seq = 3", (), 3, "missing"),
        "anchor_hash": (f"UPDATE {HEADS} SET anchor_hash = $2 WHERE tenant_id = $1", ("f" * 64,), 3, "does not link"),
        "anchor_back": (
            f"UPDATE {HEADS} SET anchor_seq = 0, anchor_hash = $2 WHERE tenant_id = $1",
            (GENESIS,),
            1,
            "missing",
        ),
        "anchor_forward": (f"UPDATE {HEADS} SET anchor_seq = 3 WHERE tenant_id = $1", (), 4, "does not link"),
    }
    sql, args, bad, words = statements[tamper]
    assert await _sql(db, ctx, sql, *args) == 1
    report, _ = await audit.verify(ctx.tenant_id, "pooled")
    assert not report.intact and report.first_bad_sequence == bad and words in report.problem, report


async def test_everything_older_prunes_to_an_empty_chain_that_verifies_and_appends(db):
    audit, store = ConfigAudit("inference", db), PolicyStore(db)
    ctx = _tenant("pooled")
    await _changes(audit, store, ctx, 3)
    await _backdate(audit, ctx, 3, days=2)
    assert await _sweeper(Policy(ctx.tenant_id, "pooled", audit_days=1), audit=audit).run_once() == 3
    report, head, anchor = await audit.verify_anchored(ctx.tenant_id, "pooled")
    assert report.intact and report.checked == 0 and head[0] == anchor.sequence == 3 and head[1] == anchor.hash
    await _changes(audit, store, ctx, 1)
    assert (await audit.verify(ctx.tenant_id, "pooled"))[0].intact and await _seqs(audit, ctx) == [4]


async def test_batches_and_concurrent_sweepers_prune_each_event_once(db):
    """Three replicas sweep at once in batches of 4: 25 old events pruned once in all, anchor at 25."""
    audit, store = ConfigAudit("inference", db), PolicyStore(db)
    ctx = _tenant("pooled")
    await _changes(audit, store, ctx, 30)
    await _backdate(audit, ctx, 25, days=2)
    policy = Policy(ctx.tenant_id, "pooled", audit_days=1)
    now = time.time_ns() // 1000
    counts = await asyncio.gather(*(audit.prune(policy, now, batch=4) for _ in range(3)))
    assert sum(counts) == 25
    assert await _seqs(audit, ctx) == [26, 27, 28, 29, 30]
    report, _, anchor = await audit.verify_anchored(ctx.tenant_id, "pooled")
    assert report.intact and anchor.sequence == 25


async def test_a_gap_stops_pruning_so_verify_still_sees_it(db):
    """An old event removed behind the sweeper's back: pruning stops before the gap, verify names it."""
    audit, store = ConfigAudit("inference", db), PolicyStore(db)
    ctx = _tenant("pooled")
    await _changes(audit, store, ctx, 5)
    await _backdate(audit, ctx, 5, days=3)
    assert await _sql(db, ctx, f"DELETE FROM {EVENTS} WHERE tenant_id = $1 AND seq = 3") == 1
    assert await _sweeper(Policy(ctx.tenant_id, "pooled", audit_days=1), audit=audit).run_once() == 2
    report, _ = await audit.verify(ctx.tenant_id, "pooled")
    assert not report.intact and report.first_bad_sequence == 3 and "missing" in report.problem
