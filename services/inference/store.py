"""The inference proxy's tables: model policies, private models, and the usage outbox.

Policies and private models are tenant-owned (ORM criteria + RLS). The outbox is a platform
table: the proxy alone reads it, to deliver usage to metering in order; no RPC exposes it.
No grpc imports.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence

import orjson
from sqlalchemy import (
    BigInteger,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    delete,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.util.concurrency import await_, greenlet_spawn

from services.inference.budget import Tokens
from services.inference.policy import Policy, PrivateModel
from services.inference.usage import UsageEvent
from shared import errors
from shared.db import Base, Database, TenantOwned
from shared.db.raw import autocommit_fetch, raw_transaction, sqlite_sql

_ROW_ID = BigInteger().with_variant(Integer(), "sqlite")


class InferenceBase(Base):
    """The declarative base of the inference proxy's own tables."""


class PolicyRow(InferenceBase, TenantOwned):
    """A tenant's model policy (one row per tenant)."""

    __tablename__ = "inference_policies"
    __table_args__ = (UniqueConstraint("tenant_id", name="uq_inference_policies_tenant"),)

    id: Mapped[int] = mapped_column(_ROW_ID, primary_key=True, autoincrement=True)
    allowed_models: Mapped[str] = mapped_column(Text, default="[]")
    default_model: Mapped[str] = mapped_column(String(100), default="")
    pinned_versions: Mapped[str] = mapped_column(Text, default="{}")
    max_tokens_ceiling: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(BigInteger)


class PrivateModelRow(InferenceBase, TenantOwned):
    """A model only its tenant may call."""

    __tablename__ = "inference_private_models"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_inference_private_models_name"),)

    id: Mapped[int] = mapped_column(_ROW_ID, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    upstream_model: Mapped[str] = mapped_column(String(200))
    base_url: Mapped[str] = mapped_column(String(500), default="")
    lineage: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[int] = mapped_column(BigInteger)


class OutboxRow(InferenceBase):
    """Usage not yet acknowledged by metering; delivered oldest first (by id) per tenant."""

    __tablename__ = "inference_usage_outbox"

    id: Mapped[int] = mapped_column(_ROW_ID, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)


def _iso(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class PolicyStore:
    """Reads and writes policies and private models of the current tenant."""

    def __init__(self, db: Database):
        self._db = db

    async def policy(self) -> Policy:
        """The current tenant's stored policy (empty when none is set)."""
        async with self._db.session() as s:
            row = (await s.execute(select(PolicyRow))).scalar_one_or_none()
        if row is None:
            return Policy()
        return Policy(
            tuple(json.loads(row.allowed_models)),
            row.default_model,
            json.loads(row.pinned_versions),
            row.max_tokens_ceiling,
        )

    async def put_policy(self, policy: Policy) -> None:
        """Replace the current tenant's policy."""
        async with self._db.session() as s:
            row = (await s.execute(select(PolicyRow))).scalar_one_or_none()
            if row is None:
                row = PolicyRow()
                s.add(row)
            row.allowed_models = json.dumps(list(policy.allowed_models))
            row.default_model = policy.default_model
            row.pinned_versions = json.dumps(policy.pinned_versions, sort_keys=True)
            row.max_tokens_ceiling = policy.max_tokens_ceiling
            row.updated_at = int(time.time())

    async def private_models(self) -> dict[str, PrivateModel]:
        """The current tenant's private models, by name."""
        async with self._db.session() as s:
            rows = (await s.execute(select(PrivateModelRow).order_by(PrivateModelRow.name))).scalars().all()
        return {r.name: _private(r) for r in rows}

    async def add_private_model(self, model: PrivateModel) -> PrivateModel | None:
        """Register a private model; None when the tenant already has one by that name."""
        async with self._db.session() as s:
            taken = (await s.execute(select(PrivateModelRow.id).where(PrivateModelRow.name == model.name))).first()
            if taken is not None:
                return None
            row = PrivateModelRow(
                name=model.name,
                upstream_model=model.upstream_model,
                base_url=model.base_url,
                lineage=model.lineage,
                created_at=int(time.time()),
            )
            s.add(row)
        return _private(row)

    async def list_private_models(self, *, after: str, limit: int) -> list[PrivateModel]:
        """A page of the current tenant's private models with names after `after`."""
        async with self._db.session() as s:
            rows = (
                (
                    await s.execute(
                        select(PrivateModelRow)
                        .where(PrivateModelRow.name > after)
                        .order_by(PrivateModelRow.name)
                        .limit(limit)
                    )
                )
                .scalars()
                .all()
            )
        return [_private(r) for r in rows]


def _private(row: PrivateModelRow) -> PrivateModel:
    return PrivateModel(row.name, row.upstream_model, row.base_url, row.lineage, _iso(row.created_at))


class SqlOutbox:
    """The durable usage outbox (implements usage.Outbox)."""

    def __init__(self, db: Database):
        self._db = db

    async def append(self, events: Sequence[UsageEvent]) -> None:
        """Persist events in order."""
        now = int(time.time())
        async with self._db.system_session() as s:
            s.add_all([OutboxRow(tenant_id=e.tenant_id, payload=_dump(e), created_at=now) for e in events])

    async def pending(self, tenant_id: str, limit: int) -> list[tuple[int, UsageEvent]]:
        """The tenant's oldest undelivered events."""
        async with self._db.system_session() as s:
            rows = (
                (
                    await s.execute(
                        select(OutboxRow).where(OutboxRow.tenant_id == tenant_id).order_by(OutboxRow.id).limit(limit)
                    )
                )
                .scalars()
                .all()
            )
        return [(r.id, _load(r.payload)) for r in rows]

    async def delete(self, ids: Sequence[int]) -> None:
        """Forget delivered events."""
        async with self._db.system_session() as s:
            await s.execute(delete(OutboxRow).where(OutboxRow.id.in_(list(ids))))

    async def tenants(self) -> set[str]:
        """Tenants with undelivered events."""
        async with self._db.system_session() as s:
            return set((await s.execute(select(OutboxRow.tenant_id).distinct())).scalars().all())

    async def count(self) -> int:
        """Undelivered events of every tenant."""
        async with self._db.system_session() as s:
            return len((await s.execute(select(OutboxRow.id))).all())


def _dump(e: UsageEvent) -> str:
    t = e.tokens
    return json.dumps(
        {
            "tenant_id": e.tenant_id,
            "idempotency_key": e.idempotency_key,
            "principal_id": e.principal_id,
            "agent_id": e.agent_id,
            "run_id": e.run_id,
            "model": e.model,
            "tokens": [t.input, t.output, t.cache_write, t.cache_read],
            "latency_ms": e.latency_ms,
            "outcome": e.outcome,
            "occurred_at": e.occurred_at,
            "trace_id": e.trace_id,
            "tier": e.tier,
            "attempt": e.attempt,
            "at_reservation": e.at_reservation,
        }
    )


def _load(payload: str) -> UsageEvent:
    d = json.loads(payload)
    return UsageEvent(**{**d, "tokens": Tokens(*d["tokens"])})


class AttemptRow(InferenceBase):
    """One upstream attempt, written before it is sent (see services.inference.attempts)."""

    __tablename__ = "inference_attempts"
    __table_args__ = (
        UniqueConstraint("tenant_id", "request_id", "attempt", name="uq_inference_attempts_attempt"),
        Index("ix_inference_attempts_state_created", "state", "created_ms"),
    )

    id: Mapped[int] = mapped_column(_ROW_ID, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(200))
    attempt: Mapped[int] = mapped_column(Integer)
    replica: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200))
    reserve_input: Mapped[int] = mapped_column(BigInteger)
    reserve_output: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[int] = mapped_column(SmallInteger)
    at_reservation: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    input_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    output_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    outcome: Mapped[str] = mapped_column(String(16), server_default="")
    latency_ms: Mapped[int] = mapped_column(BigInteger, server_default="0")
    context: Mapped[str] = mapped_column(Text)
    created_ms: Mapped[int] = mapped_column(BigInteger)


# A group's opens in one statement: each row's attempt number is the next for its request id,
# taken in the insert itself (the unique constraint catches two replicas taking the same one at
# once; the group is then retried). A group holds a request id at most once (the journal defers
# repeats), and rows come back keyed by (tenant, request id), not by position.
_OPEN_COLUMNS = (
    "INSERT INTO inference_attempts (tenant_id, request_id, attempt, replica, model, reserve_input, "
    "reserve_output, state, at_reservation, context, created_ms) "
)
_NEXT = (
    "COALESCE((SELECT MAX(a.attempt) FROM inference_attempts AS a WHERE a.tenant_id = v.t "
    "AND a.request_id = v.r), 0) + 1"
)
_PG_OPEN = (
    _OPEN_COLUMNS + f"SELECT v.t, v.r, {_NEXT}, CAST($1 AS VARCHAR), v.m, v.ri, v.ro, 0, 0, v.c, v.cm "
    "FROM unnest(CAST($2 AS VARCHAR[]), CAST($3 AS VARCHAR[]), CAST($4 AS VARCHAR[]), CAST($5 AS BIGINT[]), "
    "CAST($6 AS BIGINT[]), CAST($7 AS TEXT[]), CAST($8 AS BIGINT[])) AS v(t, r, m, ri, ro, c, cm) "
    "RETURNING tenant_id, request_id, id, attempt"
)
# SQLite has no arrays: the group travels as one JSON array of rows.
_SQLITE_OPEN = (
    _OPEN_COLUMNS + f"SELECT v.t, v.r, {_NEXT}, $1, v.m, v.ri, v.ro, 0, 0, v.c, v.cm FROM ("
    "SELECT json_extract(value, '$[0]') AS t, json_extract(value, '$[1]') AS r, "
    "json_extract(value, '$[2]') AS m, json_extract(value, '$[3]') AS ri, "
    "json_extract(value, '$[4]') AS ro, "
    "json_extract(value, '$[5]') AS c, json_extract(value, '$[6]') AS cm FROM json_each($2)) AS v "
    "RETURNING tenant_id, request_id, id, attempt"
)
_SETTLE = (
    "UPDATE inference_attempts SET state = 1, input_tokens = $2, output_tokens = $3, cache_write_tokens = $4, "
    "cache_read_tokens = $5, outcome = $6, latency_ms = $7, at_reservation = $8 WHERE id = $1 AND state = 0"
)
_DELIVERED = "UPDATE inference_attempts SET state = 2 WHERE id = $1"
# Postgres: a whole group in one statement, so one round trip (run as its own implicit transaction)
# instead of BEGIN, insert, settles, deliveries and COMMIT. No row is changed twice in it: a row both
# settled and delivered in the group is settled straight to state 2, and the deliveries skip the rows
# the settle changed (a delivered row whose settle found it no longer open is still closed, as before).
_PG_GROUP = (
    "WITH settled AS (UPDATE inference_attempts AS a SET state = CASE WHEN s.done THEN 2 ELSE 1 END, "
    "input_tokens = s.i, output_tokens = s.o, cache_write_tokens = s.cw, cache_read_tokens = s.cr, "
    "outcome = s.oc, latency_ms = s.lat, at_reservation = s.ar "
    "FROM unnest(CAST($9 AS BIGINT[]), CAST($10 AS BIGINT[]), CAST($11 AS BIGINT[]), CAST($12 AS BIGINT[]), "
    "CAST($13 AS BIGINT[]), CAST($14 AS VARCHAR[]), CAST($15 AS BIGINT[]), CAST($16 AS SMALLINT[]), "
    "CAST($17 AS BOOLEAN[])) AS s(id, i, o, cw, cr, oc, lat, ar, done) "
    "WHERE a.id = s.id AND a.state = 0 RETURNING a.id), "
    "delivered AS (UPDATE inference_attempts SET state = 2 WHERE id = ANY(CAST($18 AS BIGINT[])) "
    "AND id NOT IN (SELECT id FROM settled)) " + _PG_OPEN
)
_RECOVER = (
    "UPDATE inference_attempts SET state = 2 WHERE state < 2 AND (replica = $1 OR created_ms < $2) "
    "RETURNING tenant_id, request_id, attempt, model, reserve_input, reserve_output, state, at_reservation, "
    "input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, outcome, latency_ms, context"
)
_TO_OUTBOX = "INSERT INTO inference_usage_outbox (tenant_id, payload, created_at) VALUES ($1, $2, $3)"
_PRUNE = "DELETE FROM inference_attempts WHERE state = 2 AND created_ms < $1"


class SqlAttempts:
    """The attempt journal's table on raw platform transactions (implements attempts.AttemptStore)."""

    def __init__(self, db: Database):
        self._db = db

    async def apply(self, opens, settles, delivered, replica: str) -> list[tuple[int, int]]:
        """Insert new attempts (returning row id and attempt number), settle and close others, in one transaction."""
        engine = self._db.engine
        for tries in range(5):  # the last try raises
            try:
                if engine.dialect.name == "sqlite" and engine.dialect.driver == "aiosqlite":
                    return _ids(opens, await _sqlite_group(engine, opens, settles, delivered, replica))
                if engine.dialect.name == "postgresql":
                    args = _pg_group_args(opens, settles, delivered, replica)
                    return _ids(opens, await autocommit_fetch(engine, _PG_GROUP, *args))
                async with raw_transaction(engine, tenant_id=None, write=True) as tx:
                    ids = await _open(tx, opens, replica) if opens else []
                    await tx.executemany(_SETTLE, settles)
                    await tx.executemany(_DELIVERED, [(i,) for i in delivered])
                return ids
            except _unique_violations():  # another replica took the same attempt number
                if tries == 4:
                    raise
        raise AssertionError("unreachable")

    async def recover(self, *, replica: str, before_ms: int) -> list[UsageEvent]:
        """Close the rows of `replica` and rows older than before_ms, turning them into outbox events atomically."""
        from services.inference.attempts import recovered_event

        now = int(time.time())
        async with raw_transaction(self._db.engine, tenant_id=None, write=True) as tx:
            rows = await tx.fetch(_RECOVER, replica, before_ms)
            events = [recovered_event(tuple(r)) for r in rows]
            await tx.executemany(_TO_OUTBOX, [(e.tenant_id, _dump(e), now) for e in events])
        return events

    async def prune(self, before_ms: int) -> int:
        """Forget done rows older than before_ms (their request ids then number attempts from 1 again)."""
        async with raw_transaction(self._db.engine, tenant_id=None, write=True) as tx:
            return await tx.execute(_PRUNE, before_ms)

    async def rows(self) -> list[tuple]:
        """Every row (tests): request id, attempt, state, at_reservation, reservation, tokens."""
        async with raw_transaction(self._db.engine, tenant_id=None) as tx:
            return [
                tuple(r)
                for r in await tx.fetch(
                    "SELECT tenant_id, request_id, attempt, state, at_reservation, reserve_input, reserve_output, "
                    "input_tokens, output_tokens, cache_write_tokens, cache_read_tokens "
                    "FROM inference_attempts ORDER BY id"
                )
            ]


async def _sqlite_group(engine: AsyncEngine, opens, settles, delivered, replica: str) -> list:
    """SqlAttempts.apply on SQLite: the whole transaction (BEGIN IMMEDIATE, the group's statements,
    COMMIT) in one trip to the driver's thread, checkout and checkin in the one greenlet around it.
    Through raw_transaction a group took four trips (BEGIN, the statements, COMMIT, and the pool's
    rollback when the connection went back) and two greenlets. The connection goes back to the pool
    marked as reset (it is: committed, or rolled back here); one that may still be in a transaction is
    thrown away instead."""
    return await greenlet_spawn(_sqlite_group_in_greenlet, engine, opens, settles, delivered, replica)


def _sqlite_group_in_greenlet(engine: AsyncEngine, opens, settles, delivered, replica: str) -> list:
    try:
        fairy = engine.sync_engine.pool.connect()
    except engine.dialect.loaded_dbapi.Error as exc:
        raise errors.Unavailable("database unavailable", reason="DATABASE_UNAVAILABLE", retry_after=1.0) from exc
    clean = False
    try:
        driver = fairy.driver_connection
        if driver is None:  # only a connection already handed back to the pool has none
            raise RuntimeError("the pooled connection has no driver connection")
        try:
            rows = await_(driver._execute(_sqlite_apply, driver._conn, opens, settles, delivered, replica))
        except BaseException:
            # Failed, or cancelled while the driver's thread may still run the group: a rollback queued
            # behind it ends whatever it left (nothing, when it committed or rolled back itself).
            await_(driver.rollback())
            clean = True
            raise
        clean = True
        return rows
    finally:
        if clean:  # back to the pool without its rollback-on-return (one more trip to the thread)
            fairy._close_special(transaction_reset=True)
        elif fairy.is_valid:  # never hand the pool a connection that may be in a transaction
            fairy.invalidate()


def _sqlite_apply(conn: sqlite3.Connection, opens, settles, delivered, replica: str) -> list:
    """The transaction of SqlAttempts.apply on SQLite, run in the driver's thread: committed, or rolled back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = []
        if opens:
            rows = conn.execute(sqlite_sql(_SQLITE_OPEN), (replica, _open_rows(opens))).fetchall()
        if settles:
            conn.executemany(sqlite_sql(_SETTLE), settles)
        if delivered:
            conn.executemany(sqlite_sql(_DELIVERED), [(i,) for i in delivered])
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
    return rows


def _pg_group_args(opens, settles, delivered, replica: str) -> tuple:
    """_PG_GROUP's arguments: the opens as _PG_OPEN's arrays, the settles by column, the deliveries."""
    done = set(delivered)
    cols = list(zip(*settles, strict=True)) if settles else [()] * 8
    return (
        replica,
        *_pg_open_columns(opens),
        *(list(c) for c in cols),
        [row_id in done for row_id in cols[0]],
        list(delivered),
    )


def _pg_open_columns(opens) -> tuple[list, ...]:
    """A group's opens as _PG_OPEN's arrays, one per column."""
    return (
        [o.tenant_id for o in opens],
        [o.request_id for o in opens],
        [o.model for o in opens],
        [o.reserve.input for o in opens],
        [o.reserve.output for o in opens],
        [o.context for o in opens],
        [o.created_ms for o in opens],
    )


def _open_rows(opens) -> str:
    """A group's opens as the JSON array _SQLITE_OPEN reads."""
    return orjson.dumps(
        [
            (o.tenant_id, o.request_id, o.model, o.reserve.input, o.reserve.output, o.context, o.created_ms)
            for o in opens
        ]
    ).decode()


def _ids(opens, rows) -> list[tuple[int, int]]:
    """(row id, attempt number) of each open, in order, from the rows the insert returned."""
    by_key = {(r[0], r[1]): (int(r[2]), int(r[3])) for r in rows}
    return [by_key[(o.tenant_id, o.request_id)] for o in opens]


async def _open(tx, opens, replica: str) -> list[tuple[int, int]]:
    """Insert a group's attempts in one statement; (row id, attempt number) of each, in order."""
    if tx.dialect == "postgresql":
        rows = await tx.fetch(_PG_OPEN, replica, *_pg_open_columns(opens))
    else:
        rows = await tx.fetch(_SQLITE_OPEN, replica, _open_rows(opens))
    return _ids(opens, rows)


def _unique_violations() -> tuple[type[BaseException], ...]:
    """Unique violations as the two drivers raise them."""
    types: list[type[BaseException]] = [sqlite3.IntegrityError]
    try:
        import asyncpg

        types.append(asyncpg.UniqueViolationError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)
