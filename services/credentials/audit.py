"""The access audit: every call on a secret or key, allowed or not, appended to a per-tenant
hash chain (shared.audit_chain). It records who, tenant, agent, run, secret, version, action,
outcome and time, never a value.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from services.credentials import store
from shared import audit_chain, errors
from shared.db import Database
from shared.tenancy import NoTenantContext, require_tenant

ALLOWED, DENIED, NOT_FOUND, CONFLICT, INVALID, FAILED = "allowed", "denied", "not_found", "conflict", "invalid", "failed"

_HASHED = ("seq", "time_us", "principal_id", "actor_id", "agent_id", "run_id", "request_id",
           "secret_name", "version", "action", "outcome", "reason")


def outcome_of(exc: BaseException) -> str:
    """The audit outcome for an error a call ended with."""
    if isinstance(exc, errors.NotFound):
        return NOT_FOUND
    if isinstance(exc, errors.PermissionDenied) or getattr(exc, "reason", "") == "DECRYPTION_FAILED":
        return DENIED
    if isinstance(exc, (errors.Aborted, errors.FailedPrecondition, errors.AlreadyExists)):
        return CONFLICT
    if isinstance(exc, errors.InvalidArgument):
        return INVALID
    return FAILED


def hashed_fields(row: store.AuditRow) -> dict[str, object]:
    """Exactly the fields the chain hash covers."""
    return {name: getattr(row, name) for name in _HASHED}


@dataclass
class AuditNote:
    """Filled in by the audited block: what the call ended up touching."""

    secret_name: str = ""
    version: int = 0


class AuditLog:
    """Appends to and verifies the tenant's chain."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def audited(self, action: str, secret_name: str = "") -> AsyncIterator[AuditNote]:
        """Audit the block's outcome: allowed when it returns, the error's outcome when it raises.

        The event is committed before the block's result reaches the caller, so a value is never
        handed out without its audit row.
        """
        note = AuditNote(secret_name)
        try:
            yield note
        except NoTenantContext:
            raise
        except errors.BulkheadError as exc:
            await self.record(action, outcome_of(exc), secret_name=note.secret_name, version=note.version,
                              reason=exc.reason)
            raise
        except Exception:
            await self.record(action, FAILED, secret_name=note.secret_name, version=note.version, reason="INTERNAL")
            raise
        await self.record(action, ALLOWED, secret_name=note.secret_name, version=note.version)

    async def record(self, action: str, outcome: str, *, secret_name: str = "", version: int = 0, reason: str = "") -> None:
        """Append one event to the current tenant's chain."""
        ctx = require_tenant()
        async with self._locks.setdefault(ctx.tenant_id, asyncio.Lock()):
            for _ in range(5):  # another replica may append the same sequence number first
                try:
                    async with self._db.session() as s:
                        head = await store.audit_head(s)
                        prev = head.hash if head else audit_chain.GENESIS
                        row = store.AuditRow(
                            seq=(head.seq if head else 0) + 1, time_us=store.now_us(),
                            principal_id=ctx.principal_id, actor_id=ctx.actor_id or "", agent_id=ctx.agent_id or "",
                            run_id=ctx.run_id or "", request_id=ctx.request_id, secret_name=secret_name,
                            version=int(version), action=action, outcome=outcome, reason=reason, prev_hash=prev)
                        row.hash = audit_chain.link(prev, hashed_fields(row))
                        s.add(row)
                        if head is None:
                            s.add(store.AuditHeadRow(seq=row.seq, hash=row.hash))
                        else:
                            head.seq, head.hash = row.seq, row.hash
                    return
                except IntegrityError:
                    continue
            raise errors.Aborted("could not append to the audit log; retry", reason="AUDIT_CONTENTION")

    async def page(self, *, after_seq: int, limit: int, secret_name: str = "") -> list[store.AuditRow]:
        """Events of the current tenant in sequence order."""
        async with self._db.session() as s:
            rows = await store.audit_page(s, after_seq=after_seq, limit=limit, secret_name=secret_name)
            s.expunge_all()
            return rows

    async def last_access_us(self, secret_name: str) -> int | None:
        """When the secret's value was last read (from the audit itself: reads write no metadata)."""
        async with self._db.session() as s:
            return (await s.execute(select(func.max(store.AuditRow.time_us)).where(
                store.AuditRow.secret_name == secret_name, store.AuditRow.action == "get",
                store.AuditRow.outcome == ALLOWED))).scalar()

    async def verify(self, *, batch: int = 1000) -> audit_chain.ChainReport:
        """Recompute the current tenant's chain against its head."""
        async with self._db.session() as s:
            head = await store.audit_head(s)
            entries: list[audit_chain.ChainEntry] = []
            after = 0
            while True:
                rows = await store.audit_page(s, after_seq=after, limit=batch)
                if not rows:
                    break
                entries.extend(audit_chain.ChainEntry(r.seq, hashed_fields(r), r.prev_hash, r.hash) for r in rows)
                after = rows[-1].seq
        return audit_chain.verify(entries, head_sequence=head.seq if head else 0,
                                  head_hash=head.hash if head else audit_chain.GENESIS)
