"""The access audit's hold (issue 16): after a tenant's batch of several events, its next batch waits (at most
HOLD_SECONDS) for as many events, so reads that gRPC hands over a little apart share one commit; a tenant
reading one call at a time, and every other tenant, is never held."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.credentials import audit as audit_mod
from services.credentials import sqlite_inline
from services.credentials.audit import AuditLog
from shared.tenancy import TenantContext, tenant_scope
from tests.services.credentials.conftest import open_db

KEY = b"k" * 32


@pytest.fixture(autouse=True)
def _no_slow_backoff(monkeypatch):
    """A loaded test machine can make any commit "slow"; these tests count inline commits."""
    monkeypatch.setattr(sqlite_inline, "SLOW_SECONDS", 60.0)


@pytest.fixture
def commits(monkeypatch) -> list[int]:
    """The size of every batch appended, in order."""
    sizes: list[int] = []
    original = AuditLog._append

    async def counted(self, tenant_id, batch):
        sizes.append(len(batch))
        return await original(self, tenant_id, batch)

    monkeypatch.setattr(AuditLog, "_append", counted)
    return sizes


def _record(log: AuditLog, tenant: str, name: str) -> asyncio.Future:
    with tenant_scope(TenantContext(tenant, "p_test", request_id="r")):
        return asyncio.ensure_future(log.record("get", "allowed", secret_name=name))


async def test_after_a_batch_of_four_the_next_waits_for_four_events(tmp_path, migrated_template, monkeypatch, commits):
    """Four concurrent events share a commit; a fifth alone is then held (not committed while the loop idles)
    until three more arrive, and the four commit together; the chain verifies."""
    monkeypatch.setattr(audit_mod, "HOLD_SECONDS", 30.0)
    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, KEY)
    try:
        await asyncio.gather(*(_record(log, "t_hold", f"a{i}") for i in range(4)))
        held = _record(log, "t_hold", "b0")
        await asyncio.sleep(0.1)
        assert not held.done() and commits == [4]
        rest = [_record(log, "t_hold", f"b{i}") for i in range(1, 4)]
        await asyncio.wait_for(asyncio.gather(held, *rest), 10)
        assert commits == [4, 4]
        with tenant_scope(TenantContext("t_hold", "p_test")):
            rows = await log.page(after_seq=0, limit=10)
            assert (await log.verify()).intact
        assert [r.secret_name for r in rows] == [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)]
    finally:
        await log.close()
        await db.close()


async def test_a_held_batch_commits_after_hold_seconds(tmp_path, migrated_template, monkeypatch, commits):
    """When the expected events do not come (the load stopped), the batch commits after HOLD_SECONDS."""
    monkeypatch.setattr(audit_mod, "HOLD_SECONDS", 0.2)
    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, KEY)
    try:
        await asyncio.gather(*(_record(log, "t_holdend", f"a{i}") for i in range(3)))
        start = time.monotonic()
        await asyncio.wait_for(_record(log, "t_holdend", "alone"), 10)
        assert time.monotonic() - start >= 0.15
        assert commits == [3, 1]
    finally:
        await log.close()
        await db.close()


async def test_one_caller_at_a_time_is_never_held(tmp_path, migrated_template, monkeypatch, commits):
    """Events one at a time (each waited for) each commit at once: no batch of several, no hold."""
    monkeypatch.setattr(audit_mod, "HOLD_SECONDS", 30.0)
    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, KEY)
    try:
        for i in range(5):
            await asyncio.wait_for(_record(log, "t_onebyone", f"s{i}"), 10)
        assert commits == [1] * 5
    finally:
        await log.close()
        await db.close()


async def test_a_tenants_batches_never_hold_another_tenant(tmp_path, migrated_template, monkeypatch, commits):
    """A's batch of four makes A's next batch wait, not B's: B's lone event commits at once."""
    monkeypatch.setattr(audit_mod, "HOLD_SECONDS", 30.0)
    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, KEY)
    try:
        await asyncio.gather(*(_record(log, "t_holda", f"a{i}") for i in range(4)))
        await asyncio.wait_for(_record(log, "t_holdb", "b"), 10)
        assert commits == [4, 1]
    finally:
        await log.close()
        await db.close()


async def test_the_hold_ends_once_the_recent_batches_are_old(tmp_path, migrated_template, monkeypatch, commits):
    """A batch of several counts for RECENT_SECONDS only: after that a lone event commits at once again."""
    monkeypatch.setattr(audit_mod, "HOLD_SECONDS", 30.0)
    monkeypatch.setattr(audit_mod, "RECENT_SECONDS", 0.1)
    db = await open_db(tmp_path, migrated_template)
    log = AuditLog(db, KEY)
    try:
        await asyncio.gather(*(_record(log, "t_holdold", f"a{i}") for i in range(4)))
        await asyncio.sleep(0.2)
        await asyncio.wait_for(_record(log, "t_holdold", "late"), 10)
        assert commits == [4, 1]
    finally:
        await log.close()
        await db.close()
