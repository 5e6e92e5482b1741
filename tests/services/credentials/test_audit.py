"""The audit: every access is recorded (including refusals), values never are, and tampering shows."""

from __future__ import annotations

import grpc

from bulkhead.credentials.v1 import credentials_pb2 as pb
from services.credentials.store import AUDIT_COLUMNS
from tests.services.credentials.conftest import expect_error


async def test_every_access_is_audited_with_who_what_and_outcome(h):
    """Allowed, not-found, conflicting and invalid calls all land in the caller's chain."""
    md = h.md(agent_id="agent-7", run_id="run-42")
    await h.stub.PutSecret(pb.PutSecretRequest(name="k", value=b"audited-value"), metadata=md)
    await h.stub.GetSecret(pb.GetSecretRequest(name="k"), metadata=md)
    await expect_error(grpc.StatusCode.NOT_FOUND, h.get("missing"))
    await expect_error(grpc.StatusCode.ABORTED, h.put("k", b"conflicting-value", cas=0))
    await expect_error(grpc.StatusCode.INVALID_ARGUMENT, h.put("bad/name", b"some-value"))
    await h.stub.ListSecrets(pb.ListSecretsRequest(), metadata=h.md())
    await h.stub.DescribeSecret(pb.DescribeSecretRequest(name="k"), metadata=h.md())
    await h.stub.Encrypt(pb.EncryptRequest(plaintext=b"p"), metadata=h.md())
    events = await h.events()
    assert [(e.sequence, e.action, e.outcome, e.secret_name) for e in events] == [
        (1, pb.ACCESS_ACTION_PUT, pb.ACCESS_OUTCOME_ALLOWED, "k"),
        (2, pb.ACCESS_ACTION_GET, pb.ACCESS_OUTCOME_ALLOWED, "k"),
        (3, pb.ACCESS_ACTION_GET, pb.ACCESS_OUTCOME_NOT_FOUND, "missing"),
        (4, pb.ACCESS_ACTION_PUT, pb.ACCESS_OUTCOME_CONFLICT, "k"),
        (5, pb.ACCESS_ACTION_PUT, pb.ACCESS_OUTCOME_INVALID, "bad/name"),
        (6, pb.ACCESS_ACTION_LIST, pb.ACCESS_OUTCOME_ALLOWED, ""),
        (7, pb.ACCESS_ACTION_DESCRIBE, pb.ACCESS_OUTCOME_ALLOWED, "k"),
        (8, pb.ACCESS_ACTION_ENCRYPT, pb.ACCESS_OUTCOME_ALLOWED, ""),
    ]
    get = events[1]
    assert (get.principal_id, get.agent_id, get.run_id, get.version) == ("p_test", "agent-7", "run-42", 1)
    assert get.request_id and get.time.seconds > 0 and len(get.hash) == 64
    assert events[2].reason == "SECRET_NOT_FOUND" and events[3].reason == "CAS_MISMATCH"


async def test_cross_tenant_attempts_are_audited_in_the_callers_chain(h):
    """B probing A's secret is recorded as B's not-found event, and A's chain does not grow."""
    await h.put("alpha-secret", b"alpha-value")
    before = len(await h.events())
    await expect_error(grpc.StatusCode.NOT_FOUND, h.get("alpha-secret", tenant=h.beta))
    probes = await h.events(h.beta)
    assert [(e.action, e.outcome, e.secret_name) for e in probes] == [
        (pb.ACCESS_ACTION_GET, pb.ACCESS_OUTCOME_NOT_FOUND, "alpha-secret")
    ]
    assert len(await h.events()) == before


async def _verify(h, tenant=None) -> pb.VerifyAccessEventsResponse:
    return await h.stub.VerifyAccessEvents(pb.VerifyAccessEventsRequest(), metadata=h.md(tenant))


async def _three_events(h) -> None:
    await h.put("k", b"chain-value")
    await h.get("k")
    await expect_error(grpc.StatusCode.NOT_FOUND, h.get("nope"))


async def test_intact_chain_verifies(h):
    """An untouched chain is intact and every event was checked."""
    await _three_events(h)
    report = await _verify(h)
    assert (report.intact, report.events_checked, report.first_bad_sequence) == (True, 3, 0)


async def test_a_changed_row_is_detected(h):
    """Rewriting an outcome in the table breaks the chain at that row."""
    await _three_events(h)
    await h.raw("UPDATE cred_audit_events SET outcome = 'allowed' WHERE tenant_id = :t AND seq = 3", {"t": h.alpha})
    report = await _verify(h)
    assert not report.intact and report.first_bad_sequence == 3 and "changed" in report.problem


async def test_a_removed_row_is_detected(h):
    """Deleting a row in the middle leaves a gap; deleting the newest disagrees with the head."""
    await _three_events(h)
    await h.raw("DELETE FROM cred_audit_events WHERE tenant_id = :t AND seq = 2", {"t": h.alpha})
    report = await _verify(h)
    assert not report.intact and report.first_bad_sequence == 2 and "missing" in report.problem


async def test_removing_the_newest_row_is_detected(h):
    """Deleting the last event (the one that would show a read) is caught by the chain head."""
    await _three_events(h)
    await h.raw("DELETE FROM cred_audit_events WHERE tenant_id = :t AND seq = 3", {"t": h.alpha})
    report = await _verify(h)
    assert not report.intact and report.first_bad_sequence == 3


async def test_a_rebuilt_chain_without_the_key_is_detected(h):
    """Rewriting a row and recomputing every later hash and the head (without the HMAC key) fails."""
    from shared import audit_chain

    await _three_events(h)
    names = AUDIT_COLUMNS[: AUDIT_COLUMNS.index("prev_hash")]  # what the chain links; the hashes follow
    rows = await h.raw(
        f"SELECT {', '.join(names)} FROM cred_audit_events WHERE tenant_id = :t ORDER BY seq", {"t": h.alpha}
    )
    prev = (await h.raw("SELECT hash FROM cred_audit_events WHERE tenant_id = :t AND seq = 1", {"t": h.alpha}))[0][0]
    for row in rows[1:]:
        fields = dict(zip(names, row, strict=True))
        fields["outcome"] = "denied" if fields["seq"] == 2 else fields["outcome"]
        forged = audit_chain.link(prev, fields)  # the attacker has the table, not the key
        await h.raw(
            "UPDATE cred_audit_events SET outcome = :o, prev_hash = :p, hash = :h WHERE tenant_id = :t AND seq = :s",
            {"o": fields["outcome"], "p": prev, "h": forged, "t": h.alpha, "s": fields["seq"]},
        )
        prev = forged
    await h.raw("UPDATE cred_audit_heads SET hash = :h WHERE tenant_id = :t", {"h": prev, "t": h.alpha})
    report = await _verify(h)
    assert not report.intact and report.first_bad_sequence == 2 and "changed" in report.problem


async def test_access_events_page_in_order(h):
    """ListAccessEvents pages oldest first with a token, and filters by secret."""
    for i in range(4):
        await h.put(f"s{i}", b"paged-value")
    first = await h.stub.ListAccessEvents(pb.ListAccessEventsRequest(page_size=3), metadata=h.md())
    second = await h.stub.ListAccessEvents(
        pb.ListAccessEventsRequest(page_size=3, page_token=first.next_page_token), metadata=h.md()
    )
    assert [e.sequence for e in first.events] == [1, 2, 3] and first.next_page_token
    assert [e.sequence for e in second.events] == [4] and not second.next_page_token
    assert [e.secret_name for e in await h.events(secret_name="s2")] == ["s2"]


async def _chain_of(db, tenant: str, key: bytes):
    from services.credentials.audit import AuditLog
    from shared.tenancy import TenantContext, tenant_scope

    log = AuditLog(db, key)
    return log, tenant_scope(TenantContext(tenant, "p_test", request_id="r"))


async def test_concurrent_events_are_group_committed_in_order(tmp_path, migrated_template):
    """Many concurrent events share commits, each gets its own sequence, and the chain verifies."""
    import asyncio

    from tests.services.credentials.conftest import open_db

    db = await open_db(tmp_path, migrated_template)
    log, scope = await _chain_of(db, "t_group", b"k" * 32)
    try:
        with scope:
            await asyncio.gather(*(log.record("get", "allowed", secret_name=f"s{i}") for i in range(40)))
            rows = await log.page(after_seq=0, limit=100)
            report = await log.verify()
        assert [r.seq for r in rows] == list(range(1, 41))
        assert sorted(r.secret_name for r in rows) == sorted(f"s{i}" for i in range(40))
        assert report.intact and report.checked == 40
    finally:
        await log.close()
        await db.close()


async def test_two_replicas_appending_to_one_chain_keep_it_intact(tmp_path, migrated_template):
    """Two AuditLogs on one database (two replicas) interleave: stale cached heads are detected and
    retried, no sequence is used twice and the chain verifies."""
    from tests.services.credentials.conftest import open_db

    db = await open_db(tmp_path, migrated_template)
    first, scope = await _chain_of(db, "t_replicas", b"k" * 32)
    second, _ = await _chain_of(db, "t_replicas", b"k" * 32)
    try:
        with scope:
            await alternate_appends_make_one_chain(first, second)
    finally:
        await first.close()
        await second.close()
        await db.close()


async def alternate_appends_make_one_chain(first, second) -> None:
    """Two AuditLogs (two replicas) append in turn for the current tenant: one gapless chain that verifies."""
    for i in range(6):
        await (first if i % 2 else second).record("get", "allowed", secret_name=f"s{i}")
    rows = await first.page(after_seq=0, limit=100)
    report = await first.verify()
    assert [(r.seq, r.secret_name) for r in rows] == [(i + 1, f"s{i}") for i in range(6)]
    assert report.intact and report.checked == 6


async def test_a_failed_append_fails_the_call_and_writes_nothing(tmp_path, migrated_template, monkeypatch):
    """If the append breaks after its first insert, the caller gets the error and no row remains."""
    import pytest

    from services.credentials import store
    from tests.services.credentials.conftest import open_db

    db = await open_db(tmp_path, migrated_template)
    log, scope = await _chain_of(db, "t_broken", b"k" * 32)
    try:
        with scope:
            await log.record("get", "allowed", secret_name="before")

            def broken(conn, tenant_id, rows, *, head_seq):
                conn.executemany(store.sqlite_sql(store._INSERT_AUDIT), [(tenant_id, *row) for row in rows])
                raise OSError("disk gone")

            monkeypatch.setattr(store, "sqlite_append_audit", broken)
            with pytest.raises(OSError):
                await log.record("get", "allowed", secret_name="lost")
            monkeypatch.undo()
            await log.record("get", "allowed", secret_name="after")
            rows = await log.page(after_seq=0, limit=100)
            report = await log.verify()
        assert [(r.seq, r.secret_name) for r in rows] == [(1, "before"), (2, "after")]
        assert report.intact
    finally:
        await log.close()
        await db.close()
