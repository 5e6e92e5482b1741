"""The configuration audit, once: every configuration change appended to a per-tenant hash chain
(shared.audit_chain) in the same transaction as the change, and ConfigAuditService to read and
verify it.

A configuration-owning service (identity, orchestrator, metering, inference) adds it with one line
in its server.py::

    audit = ConfigAudit("orchestrator", db, tiers=tiers)
    bindings=[binding, lifecycle_binding("orchestrator", db, [OrchestratorBase.metadata, audit.metadata]),
              audit.binding()]

and wraps each configuration-changing handler::

    async with self._audit.change("team.update", tenant_id=ctx.tenant_id, tier=ctx.tier,
                                  target=f"team/{name}", tables={"orch_teams"}):
        record = await self._o.update_team(...)

The event is written by a `before_commit` hook of the first transaction that writes one of
`tables` for that tenant in the chain's store, so the change and its event commit together or not
at all. A call that wrote nothing there (a repeat that changed nothing) adds no event; a change
must therefore go through Database.session() (the ORM session), which every audited call site does.

Events hold ids, names, scopes, limits and statuses; a detail value that looks like a secret (an
API key, a token) is stored as "[redacted]".
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import event, inspect, text
from sqlalchemy.orm import ORMExecuteState, Session

from bulkhead.common.v1 import audit_pb2 as pb
from bulkhead.common.v1 import audit_pb2_grpc
from shared import audit_chain, paging, retention
from shared.db import Database
from shared.db.base import NAMING_CONVENTION, TENANT_COLUMN_INFO
from shared.db.router import Route
from shared.db.session import SEARCH_PATH_KEY, SYSTEM_KEY, TENANT_KEY, TenantSession
from shared.errors import InvalidArgument, PermissionDenied, Reason
from shared.ids import TENANT_ID_HINT, is_tenant_id
from shared.paging import page_size
from shared.server import Binding
from shared.tenancy import PLATFORM_TENANT, require_tenant
from shared.tiers import Tier, TierLookup

log = logging.getLogger("bulkhead.config_audit")

SERVED_BY = ("identity", "orchestrator", "metering", "inference")
"""The services that keep a configuration chain and serve ConfigAuditService (the isolation matrix
attacks it on each; a test checks the other services do not serve it)."""

READ_SCOPE = "audit.config.read"
"""The scope of ListAuditEvents and VerifyAuditEvents."""

_HASHED = (
    "tenant_id",
    "seq",
    "time_us",
    "principal_id",
    "operator_id",
    "delegator_id",
    "agent_id",
    "request_id",
    "action",
    "target",
    "detail",
)
_SECRET_KEYS = frozenset(
    {"secret", "secret_hash", "api_key", "token", "access_token", "password", "private_key", "value", "headers"}
)
_SECRET_VALUE = re.compile(r"(^|\W)(bk_t_\w+|eyJ[\w-]{8,}\.[\w-]+|sk-[\w-]{8,})", re.IGNORECASE)
_WRITTEN = "bulkhead.config_audit.written"
_NEW = "bulkhead.config_audit.new"


def table_names(service: str) -> tuple[str, str]:
    """(events table, heads table) of a service: named per service, so services may share a database."""
    return f"{service}_config_audit_events", f"{service}_config_audit_heads"


def build_metadata(service: str) -> sa.MetaData:
    """The service's two audit tables as Core tables (for the lifecycle's inventory and purge)."""
    events, heads = table_names(service)
    md = sa.MetaData(naming_convention=NAMING_CONVENTION)
    sa.Table(events, md, *_event_columns(), sa.PrimaryKeyConstraint("tenant_id", "seq"))
    sa.Table(heads, md, *_head_columns(), sa.PrimaryKeyConstraint("tenant_id"))
    return md


def _tenant_column() -> sa.Column:
    return sa.Column("tenant_id", sa.String(64), nullable=False, info={TENANT_COLUMN_INFO: True})


def _event_columns() -> list[sa.Column]:
    return [
        _tenant_column(),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("time_us", sa.BigInteger, nullable=False),
        *(
            sa.Column(name, sa.String(200), nullable=False)
            for name in ("principal_id", "operator_id", "delegator_id", "agent_id", "request_id")
        ),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(300), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    ]


def _head_columns() -> list[sa.Column]:
    return [*_first_head_columns(), *_anchor_columns()]


def _first_head_columns() -> list[sa.Column]:
    """The heads table as create_tables made it (migrations then add_anchor)."""
    return [
        _tenant_column(),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    ]


def _anchor_columns() -> list[sa.Column]:
    """Where the chain starts once retention pruned its oldest events (shared.retention): the last
    pruned event's sequence, hash and time; 0/GENESIS/0 while nothing was pruned."""
    return [
        sa.Column("anchor_seq", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("anchor_hash", sa.String(64), nullable=False, server_default=audit_chain.GENESIS),
        sa.Column("anchor_time_us", sa.BigInteger, nullable=False, server_default="0"),
    ]


def create_tables(service: str) -> None:
    """Migration step: the service's audit tables, with tenant row-level security (upgrade() grants them
    to the runtime role)."""
    from alembic import op

    from shared.db.rls import enable_tenant_rls

    events, heads = table_names(service)
    op.create_table(events, *_event_columns(), sa.PrimaryKeyConstraint("tenant_id", "seq", name=f"pk_{events}"))
    op.create_table(heads, *_first_head_columns(), sa.PrimaryKeyConstraint("tenant_id", name=f"pk_{heads}"))
    enable_tenant_rls(events)
    enable_tenant_rls(heads)


def add_anchor(service: str) -> None:
    """Migration step: the heads table's retention anchor (shared.retention)."""
    from alembic import op

    for column in _anchor_columns():
        op.add_column(table_names(service)[1], column)


def drop_anchor(service: str) -> None:
    """Migration step (downgrade of add_anchor)."""
    from alembic import op

    with op.batch_alter_table(table_names(service)[1]) as batch:
        for column in reversed(_anchor_columns()):
            batch.drop_column(column.name)


def drop_tables(service: str) -> None:
    """Migration step (downgrade)."""
    from alembic import op

    for name in table_names(service):
        op.drop_table(name)


def load_chain_key(service: str, env: Mapping[str, str]) -> bytes:
    """The HMAC key of the service's chains: the file BULKHEAD_<SVC>_CONFIG_AUDIT_KEY names, else none.

    With a key, someone who can write the tables but does not hold it cannot rebuild a consistent
    chain; every replica of a service must then read the same file."""
    path = env.get(f"BULKHEAD_{service.upper()}_CONFIG_AUDIT_KEY")
    return Path(path).read_bytes().strip() if path else b""


REDACTED = "[redacted]"


def secret_free(detail: Mapping[str, object]) -> dict[str, str]:
    """The detail as strings, with any value that is or looks like a secret (a key named like one, an API
    key, a JWT, a provider key) replaced by REDACTED: call sites pass none, and names users choose may."""
    out: dict[str, str] = {}
    for key, value in detail.items():
        if isinstance(value, (list, tuple, set, frozenset)):
            value = ",".join(sorted(str(v) for v in value))
        value = "" if value is None else str(value)
        if str(key).lower() in _SECRET_KEYS or _SECRET_VALUE.search(value):
            value = REDACTED
        out[str(key)] = value[:500]
    return out


Describe = Callable[[Sequence[object]], tuple[str, Mapping[str, object]]]
"""Names the target (and adds detail) from the objects the change's transaction inserted, for
changes whose ids are made inside the domain call (a new principal, API key, tenant)."""


@dataclass
class _Pending:
    """A change in progress: its event is written by the first transaction that makes the change."""

    audit: ConfigAudit
    tenant_id: str | None
    """The chain's tenant; None: the tenant the writing session is bound to (a tenant created here)."""
    route: Route | None
    tier: str
    """Where the chain lives (the rows tier of the service, else the tenant's)."""
    tables: frozenset[str]
    fields: dict[str, Any]
    describe: Describe | None = None
    written: bool = False
    closed: bool = False
    """The change's block has ended: a task that copied the context (a background run it started)
    must not write the event later."""
    sequence: int = 0
    session_id: int = 0
    """id() of the session whose transaction carries the event."""


@dataclass(frozen=True)
class Anchor:
    """Where a chain starts after retention pruning: the last pruned event (0: none pruned)."""

    sequence: int = 0
    hash: str = audit_chain.GENESIS
    time_us: int = 0

    def as_pb(self) -> pb.ChainAnchor:
        return pb.ChainAnchor(sequence=self.sequence, hash=self.hash, time=_ts(self.time_us) if self.time_us else None)


_pending: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar("bulkhead_config_audit", default=None)


class ConfigAudit:
    """One service's configuration audit: appends (through `change`), pages and verifies chains."""

    def __init__(
        self,
        service: str,
        db: Database,
        *,
        tiers: TierLookup | None = None,
        rows_tier: Tier | None = None,
        key: bytes | None = None,
    ) -> None:
        """tiers: identity's word on another tenant's tier (for operators' reads); rows_tier: where the
        service keeps every tenant's rows whatever its tier (identity: pooled); key: HMAC links (None:
        load_chain_key from the process environment)."""
        self.service = service
        self._db = db
        self._tiers = tiers
        self._rows_tier = rows_tier
        self._key = load_chain_key(service, os.environ) if key is None else key
        self.events_table, self.heads_table = table_names(service)
        self.metadata = build_metadata(service)

    # ---------------------------------------------------------------- appending

    @contextlib.asynccontextmanager
    async def change(
        self,
        action: str,
        *,
        target: str = "",
        tenant_id: str | None = None,
        tier: Tier | str | None = None,
        tables: Iterable[str],
        detail: Mapping[str, object] | None = None,
        describe: Describe | None = None,
    ) -> AsyncIterator[None]:
        """Audit the block's configuration change: one event on tenant_id's chain (None: the tenant the
        change's own session is bound to), committed with the first transaction that writes one of
        `tables` there. None when the block raises or wrote nothing there."""
        caller = require_tenant()
        chain_tenant = tenant_id
        operator = caller.tenant_id == PLATFORM_TENANT and chain_tenant != PLATFORM_TENANT
        fields = {
            "time_us": 0,
            "principal_id": caller.principal_id,
            "operator_id": caller.principal_id if operator else "",
            "delegator_id": "" if operator else (caller.actor_id or ""),
            "agent_id": caller.agent_id or "",
            "request_id": caller.request_id,
            "action": action,
            "target": target,
            "detail": secret_free(detail or {}),
        }
        chain_tier = (self._rows_tier or (Tier.parse(tier) if tier else Tier.POOLED)).value
        route = await self._db.router.route(chain_tenant, chain_tier) if chain_tenant is not None else None
        pending = _Pending(self, chain_tenant, route, chain_tier, frozenset(tables), fields, describe)
        token = _pending.set(pending)
        try:
            yield
        finally:
            pending.closed = True
            _pending.reset(token)
        if not pending.written:  # a repeat that changed nothing: no change, no event
            log.debug("%s: %s wrote nothing, so no event", self.service, action)

    def change_own(
        self,
        action: str,
        *,
        target: str,
        tables: Iterable[str],
        detail: Mapping[str, object] | None = None,
        describe: Describe | None = None,
    ):
        """change() on the caller's own chain (a tenant changing its own configuration)."""
        ctx = require_tenant()
        return self.change(
            action,
            target=target,
            tenant_id=ctx.tenant_id,
            tier=ctx.tier,
            tables=tables,
            detail=detail,
            describe=describe,
        )

    def _append_sync(self, session: Session, pending: _Pending, tenant_id: str) -> None:
        """Insert the event after the chain head, inside the session's transaction (head row locked)."""
        conn = session.connection()
        postgres = conn.dialect.name == "postgresql"
        if postgres and session.info.get(SYSTEM_KEY):  # a platform session: RLS needs the chain's tenant
            conn.execute(text("SELECT set_config('app.tenant_id', :t, true)"), {"t": tenant_id})
        conn.execute(
            text(
                f"INSERT INTO {self.heads_table} (tenant_id, seq, hash) VALUES (:t, 0, :g) "
                "ON CONFLICT (tenant_id) DO NOTHING"
            ),
            {"t": tenant_id, "g": audit_chain.GENESIS},
        )
        head = conn.execute(
            text(
                f"SELECT seq, hash FROM {self.heads_table} WHERE tenant_id = :t" + (" FOR UPDATE" if postgres else "")
            ),
            {"t": tenant_id},
        ).one()
        fields = dict(pending.fields)
        if pending.describe is not None:
            target, extra = pending.describe(session.info.get(_NEW, ()))
            fields["target"] = target
            fields["detail"] = {**fields["detail"], **secret_free(extra)}
        seq = int(head[0]) + 1
        fields.update(tenant_id=tenant_id, seq=seq, time_us=time.time_ns() // 1000)
        digest = audit_chain.link(str(head[1]), _hashed(fields), self._key)
        row = {**fields, "detail": _detail_json(fields["detail"]), "prev_hash": str(head[1]), "hash": digest}
        columns = [c.name for c in _event_columns()]
        conn.execute(
            text(
                f"INSERT INTO {self.events_table} ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})"
            ),
            {c: row[c] for c in columns},
        )
        conn.execute(
            text(f"UPDATE {self.heads_table} SET seq = :s, hash = :h WHERE tenant_id = :t"),
            {"s": seq, "h": digest, "t": tenant_id},
        )
        pending.written, pending.sequence, pending.session_id = True, seq, id(session)

    def _matches(self, session: Session, pending: _Pending) -> str | None:
        """The chain tenant when this committing session is where the pending change's event belongs."""
        written = session.info.get(_WRITTEN) or set()
        if not (written & pending.tables):
            return None
        bound = session.info.get(TENANT_KEY)
        tenant = pending.tenant_id if pending.tenant_id is not None else bound
        if tenant is None:
            return None
        if session.info.get(SYSTEM_KEY):
            # A platform session writes the main database: only a chain kept there may ride on it.
            if pending.route is None or pending.route.schema or pending.route.bind is not self._db.engine:
                return None
            return tenant
        if bound != tenant:
            return None
        if pending.route is not None and (
            session.bind is not pending.route.bind.sync_engine
            or session.info.get(SEARCH_PATH_KEY) != pending.route.schema
        ):
            return None
        return tenant

    # ---------------------------------------------------------------- reading

    async def _target(self, requested: str) -> tuple[str, str]:
        """(tenant, tier) whose chain a caller may read: its own, or any for an operator."""
        caller = require_tenant()
        if not requested or requested == caller.tenant_id:
            return caller.tenant_id, (self._rows_tier or Tier.parse(caller.tier)).value
        if not is_tenant_id(requested):
            raise InvalidArgument(
                "tenant_id is malformed",
                reason=Reason.INVALID_TENANT_ID,
                violations={"tenant_id": f"{TENANT_ID_HINT}, or empty for your own"},
            )
        if not caller.is_operator:
            # The same answer for a real tenant and a made-up id: nothing says which exists.
            raise PermissionDenied("only platform operators may read another tenant's audit", reason="OPERATOR_ONLY")
        if self._rows_tier is not None:
            return requested, self._rows_tier.value
        if requested == PLATFORM_TENANT or self._tiers is None:
            return requested, Tier.POOLED.value
        return requested, (await self._tiers.tier_of(requested)).value

    async def _rows(self, tenant_id: str, tier: str, sql: str, *args: Any) -> list[Sequence[Any]]:
        route = await self._db.router.existing(tenant_id, tier)
        if route is None:  # never stored anything: an empty chain, and no store created by reading
            return []
        from shared.db.raw import raw_transaction

        async with raw_transaction(route.bind, tenant_id=tenant_id, schema=route.schema) as tx:
            return list(await tx.fetch(sql, tenant_id, *args))

    async def head(self, tenant_id: str, tier: str) -> tuple[int, str]:
        """The recorded head of a chain ((0, GENESIS) when empty)."""
        return (await self.head_and_anchor(tenant_id, tier))[0]

    async def head_and_anchor(self, tenant_id: str, tier: str) -> tuple[tuple[int, str], Anchor]:
        """The recorded head and retention anchor of a chain, read together."""
        rows = await self._rows(
            tenant_id,
            tier,
            f"SELECT seq, hash, anchor_seq, anchor_hash, anchor_time_us FROM {self.heads_table} WHERE tenant_id = $1",
        )
        if not rows:
            return (0, audit_chain.GENESIS), Anchor()
        r = rows[0]
        return (int(r[0]), str(r[1])), Anchor(int(r[2]), str(r[3]), int(r[4]))

    async def prune(self, policy: retention.Policy, now_us: int, *, batch: int = retention.BATCH) -> int:
        """Delete the tenant's events older than its audit retention, oldest first, `batch` per
        transaction, and move the chain's anchor to the last one deleted (a retention sweeper step).

        Only a contiguous prefix is pruned: pruning stops at the first event young enough to keep and
        at any gap (a missing event stays visible to verify). The head row is locked while the anchor
        moves, so replicas sweeping at once serialize and a repeat finds nothing to do; the anchor only
        moves forward."""
        tier = (self._rows_tier or Tier.parse(policy.tier)).value
        route = await self._db.router.existing(policy.tenant_id, tier)
        if route is None:
            return 0
        cutoff, total = policy.audit_cutoff_us(now_us), 0
        while True:
            pruned = await self._prune_batch(route, policy.tenant_id, cutoff, batch)
            total += pruned
            if pruned < batch:
                return total

    async def _prune_batch(self, route: Route, tenant_id: str, cutoff_us: int, batch: int) -> int:
        pruned, anchor = await retention.prune_chain_prefix(
            route, tenant_id, events=self.events_table, heads=self.heads_table, cutoff_us=cutoff_us, batch=batch
        )
        if pruned:
            log.info(
                "%s: retention pruned %s's configuration events %d..%d",
                self.service,
                tenant_id,
                anchor - pruned + 1,
                anchor,
            )
        return pruned

    async def events(
        self,
        tenant_id: str,
        tier: str,
        *,
        after: int | None,
        limit: int,
        newest_first: bool,
        action: str = "",
        target: str = "",
    ) -> list[dict[str, Any]]:
        """A page of events as dicts (detail decoded), in the order asked."""
        columns = [c.name for c in _event_columns()]
        where: list[str] = ["tenant_id = $1"]
        args: list[int | str] = []
        if after is not None:
            args.append(after)
            where.append(f"seq {'<' if newest_first else '>'} ${len(args) + 1}")
        if action:
            args += [action, action + ".%"]
            where.append(f"(action = ${len(args)} OR action LIKE ${len(args) + 1})")
        if target:
            args.append(target)
            where.append(f"target = ${len(args) + 1}")
        args.append(limit)
        sql = (
            f"SELECT {', '.join(columns)} FROM {self.events_table} WHERE {' AND '.join(where)} "
            f"ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ${len(args) + 1}"
        )
        rows = await self._rows(tenant_id, tier, sql, *args)
        out = []
        for r in rows:
            d = dict(zip(columns, r, strict=True))
            d["detail"] = json.loads(d["detail"])
            out.append(d)
        return out

    async def verify(
        self, tenant_id: str, tier: str, *, batch: int = 1000
    ) -> tuple[audit_chain.ChainReport, tuple[int, str]]:
        """Recompute a chain against its head, from its retention anchor."""
        report, head, _ = await self.verify_anchored(tenant_id, tier, batch=batch)
        return report, head

    async def verify_anchored(
        self, tenant_id: str, tier: str, *, batch: int = 1000
    ) -> tuple[audit_chain.ChainReport, tuple[int, str], Anchor]:
        """verify(), with the anchor it started from. A sweeper pruning meanwhile moves the anchor:
        then the check is redone from the new one (a break that stays is reported)."""
        for _ in range(3):
            head, anchor = await self.head_and_anchor(tenant_id, tier)
            entries: list[audit_chain.ChainEntry] = []
            after = anchor.sequence
            while True:
                rows = await self.events(tenant_id, tier, after=after, limit=batch, newest_first=False)
                if not rows:
                    break
                entries += [audit_chain.ChainEntry(int(r["seq"]), _hashed(r), r["prev_hash"], r["hash"]) for r in rows]
                after = int(rows[-1]["seq"])
            report = audit_chain.verify(
                entries,
                head_sequence=head[0],
                head_hash=head[1],
                key=self._key,
                anchor_sequence=anchor.sequence,
                anchor_hash=anchor.hash,
            )
            if report.intact or (await self.head_and_anchor(tenant_id, tier))[1] == anchor:
                break
        return report, head, anchor

    def binding(self) -> Binding:
        """The ConfigAuditService binding the service adds to its server."""
        return Binding(
            audit_pb2_grpc.add_ConfigAuditServiceServicer_to_server,
            ConfigAuditServicer(self),
            pb.DESCRIPTOR.services_by_name["ConfigAuditService"],
        )


def _hashed(fields: Mapping[str, Any]) -> dict[str, Any]:
    out = {name: fields[name] for name in _HASHED}
    out["seq"], out["time_us"] = int(out["seq"]), int(out["time_us"])
    return out


def _detail_json(detail: Mapping[str, str]) -> str:
    return json.dumps(dict(detail), sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------- session hooks


@event.listens_for(TenantSession, "do_orm_execute")
def _note_statement(state: ORMExecuteState) -> None:
    """Remember the tables an UPDATE/INSERT/DELETE statement writes (while a change is audited)."""
    if _pending.get() is None or not (state.is_insert or state.is_update or state.is_delete):
        return
    table = getattr(state.statement, "table", None)
    name = getattr(table, "name", None)
    if name:
        state.session.info.setdefault(_WRITTEN, set()).add(name)


@event.listens_for(TenantSession, "after_flush")
def _note_flush(session: Session, flush_context: Any) -> None:
    """Remember the tables a flush wrote and the objects it inserted (while a change is audited)."""
    if _pending.get() is None:
        return
    written = session.info.setdefault(_WRITTEN, set())
    new = session.info.setdefault(_NEW, [])
    for obj in session.new:
        written.update(t.name for t in inspect(obj).mapper.tables)
        new.append(obj)
    for obj in (*session.dirty, *session.deleted):
        if obj in session.deleted or session.is_modified(obj):
            written.update(t.name for t in inspect(obj).mapper.tables)


@event.listens_for(TenantSession, "before_commit")
def _append_with_change(session: Session) -> None:
    """Write the pending change's event in the transaction that makes the change."""
    pending = _pending.get()
    if pending is None or pending.written or pending.closed:
        return
    session.flush()  # commit flushes after this hook: see what this transaction writes first
    tenant = pending.audit._matches(session, pending)
    if tenant is None:
        return
    pending.audit._append_sync(session, pending, tenant)
    if pending.tenant_id is None:
        pending.tenant_id = tenant


@event.listens_for(TenantSession, "after_rollback")
def _rolled_back(session: Session) -> None:
    """An event written in a transaction that rolled back was not written."""
    pending = _pending.get()
    if pending is not None and pending.written and pending.session_id == id(session):
        pending.written = False
    session.info.pop(_WRITTEN, None)
    session.info.pop(_NEW, None)


@event.listens_for(TenantSession, "after_commit")
def _committed(session: Session) -> None:
    session.info.pop(_WRITTEN, None)
    session.info.pop(_NEW, None)


# ---------------------------------------------------------------- the service


def _ts(time_us: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMicroseconds(int(time_us))
    return ts


def event_pb(row: Mapping[str, Any]) -> pb.AuditEvent:
    """A stored event as proto."""
    return pb.AuditEvent(
        sequence=int(row["seq"]),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
        actor=pb.AuditActor(
            principal_id=row["principal_id"],
            operator_id=row["operator_id"],
            delegator_id=row["delegator_id"],
            agent_id=row["agent_id"],
        ),
        action=row["action"],
        target=row["target"],
        detail=dict(row["detail"]),
        time=_ts(row["time_us"]),
        request_id=row["request_id"],
    )


class ConfigAuditServicer(audit_pb2_grpc.ConfigAuditServiceServicer):
    """ConfigAuditService over a ConfigAudit: proto in, chain read, proto out."""

    def __init__(self, audit: ConfigAudit) -> None:
        self._audit = audit

    async def ListAuditEvents(self, request, context):
        size = page_size(request.page_size)
        tenant_id, tier = await self._audit._target(request.tenant_id)
        filters = (request.tenant_id, bool(request.oldest_first), request.action, request.target)
        after = paging.decode(request.page_token, filters=filters)
        if after is not None and type(after) is not int:
            raise paging.invalid_token()
        for name, value, most in (("action", request.action, 64), ("target", request.target, 300)):
            if len(value) > most or not value.isprintable():
                raise InvalidArgument(
                    f"{name} filter is too long or not printable",
                    reason="FILTER_INVALID",
                    violations={name: f"at most {most} printable characters"},
                )
        head, anchor = await self._audit.head_and_anchor(tenant_id, tier)
        rows = await self._audit.events(
            tenant_id,
            tier,
            after=after,
            limit=size + 1,
            newest_first=not request.oldest_first,
            action=request.action,
            target=request.target,
        )
        page = paging.keyset(rows, size, lambda r: int(r["seq"]), filters=filters)
        return pb.ListAuditEventsResponse(
            service=self._audit.service,
            events=[event_pb(r) for r in page.items],
            next_page_token=page.next_page_token,
            head=pb.ChainHead(sequence=head[0], hash=head[1]),
            anchor=anchor.as_pb(),
        )

    async def VerifyAuditEvents(self, request, context):
        tenant_id, tier = await self._audit._target(request.tenant_id)
        report, head, anchor = await self._audit.verify_anchored(tenant_id, tier)
        return pb.VerifyAuditEventsResponse(
            service=self._audit.service,
            intact=report.intact,
            events_checked=report.checked,
            first_bad_sequence=report.first_bad_sequence,
            problem=report.problem,
            head=pb.ChainHead(sequence=head[0], hash=head[1]),
            anchor=anchor.as_pb(),
        )


def new_of(cls: type, target: str, **detail: str) -> Describe:
    """A Describe naming the first inserted `cls` object: target and detail values are format strings
    over its attributes, e.g. new_of(PrincipalRow, "principal/{id}", kind="{kind}")."""

    def describe(objects: Sequence[object]) -> tuple[str, Mapping[str, object]]:
        for obj in objects:
            if isinstance(obj, cls):
                attrs = _Attrs(obj)
                return target.format_map(attrs), {k: v.format_map(attrs) for k, v in detail.items()}
        return target.format_map(_Missing()), {}

    return describe


class _Attrs(dict):
    """format_map over an object's attributes."""

    def __init__(self, obj: object) -> None:
        super().__init__()
        self._obj = obj

    def __missing__(self, key: str) -> str:
        value = getattr(self._obj, key)
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return "?"
