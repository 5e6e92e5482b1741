"""The tenant lifecycle, once: every service inventories and purges one tenant's rows the same way.

A service registers it with one line in its server.py::

    bindings=[binding, lifecycle_binding("state", db, StateBase.metadata)]

It walks the service's SQLAlchemy metadata: every table with a `tenant_id` column holds rows of
that tenant. Tenant-owned tables (TenantOwned) live where the tier router puts the tenant
(pooled tables, a bridge schema, a silo database, an SQLite file); platform tables that name a
tenant (queues, schedules, outboxes) live in the main database. What is special to a service
comes in as hooks (run first: keys are destroyed before any row goes) and a `keep` map of tables
deletion leaves in place, each with its reason (docs/CONTRACT.md, "What deletion keeps").
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import Column, Integer, MetaData, Table

from bulkhead.common.v1 import lifecycle_pb2 as pb
from bulkhead.common.v1 import lifecycle_pb2_grpc, tenancy_pb2
from shared.db import Database
from shared.db.base import TENANT_COLUMN_INFO
from shared.db.raw import raw_transaction
from shared.db.router import Route
from shared.errors import FailedPrecondition, InvalidArgument, Unavailable
from shared.ids import check_tenant_id
from shared.server import Binding
from shared.tenancy import PLATFORM_TENANT
from shared.tiers import Tier, UnknownTier, tier_from_proto

log = logging.getLogger("bulkhead.lifecycle")

REGION_MAIN = "bulkhead_region_main"
"""Table.info key of tables whose tenant rows live in the main database of the tenant's region, whatever
its tier (shared.security_events)."""
LIFECYCLE_SCOPE = "platform.lifecycle"
"""The scope of every TenantLifecycleService method; only identity's own platform token holds it."""
MAIN_STORE = "main"


@dataclass(frozen=True)
class TableCount:
    """One table's share of a tenant's data in one store."""

    store: str
    """"main", "schema:<name>", "database:<name>" or "file:<name>"."""
    table: str
    """The table name."""
    rows: int
    """The tenant's rows."""
    checksum: str = ""
    """Hex SHA-256 over those rows in primary-key order ("" when there are none), leaving out a surrogate
    id (surrogate_key): a tier migration renumbers it in the target store."""


@dataclass
class HookResult:
    """What a service-specific hook destroyed or did before the rows went."""

    destroyed_keys: list[tuple[str, str]] = field(default_factory=list)
    """(key id, backend) of every key destroyed (or found already destroyed)."""
    actions: list[tuple[str, int]] = field(default_factory=list)
    """(name, count) of other things done, e.g. ("runs_cancelled", 2)."""


class PurgeHook(Protocol):
    """A service's own first step of a purge (credentials: destroy keys; orchestrator: stop runs)."""

    async def before_rows(self, tenant_id: str, tier: Tier) -> HookResult:
        """Runs before any row is deleted; must be idempotent."""


class MoveHook(Protocol):
    """What a service keeps of a tenant outside its database and moves with it (credentials: its secrets and
    Transit key in OpenBao). Sides come with their regions filled in; each method is idempotent."""

    async def copy(self, tenant_id: str, source: Placement, target: Placement) -> list[TableCount]:
        """Make the target hold exactly what the source holds; what it holds now, per kind."""

    async def verify(self, tenant_id: str, source: Placement,
                     target: Placement) -> tuple[list[TableCount], list[TableCount]]:
        """Both sides, per kind, in the same order."""

    async def release(self, tenant_id: str, left: Placement, current: Placement) -> list[TableCount]:
        """Destroy what the tenant left at `left`; what was there."""


@dataclass
class PurgeResult:
    """What one PurgeTenant destroyed and kept."""

    hooks: HookResult
    """What the service's hooks destroyed or did first."""
    deleted: list[TableCount]
    """Rows removed per table (for a dropped store: what it held)."""
    dropped: list[str]
    """Stores dropped whole."""
    kept: list[tuple[TableCount, str]]
    """Rows left in place on purpose, each with its reason."""


def check_request(tenant_id: str, tier_value: int) -> Tier:
    """The tier of a lifecycle request, after checking the tenant id and refusing the platform tenant."""
    check_tenant_id(tenant_id)
    if tenant_id == PLATFORM_TENANT:
        raise FailedPrecondition("the platform tenant is never purged", reason="PLATFORM_TENANT")
    if tier_value == tenancy_pb2.TIER_UNSPECIFIED:
        # A guessed tier would purge the wrong store and report success.
        raise InvalidArgument("tier must be set", reason="INVALID_TIER",
                              violations={"tier": "TIER_POOLED, TIER_BRIDGE or TIER_SILO"})
    try:
        return tier_from_proto(tier_value)
    except UnknownTier:
        raise InvalidArgument("unknown tier", reason="INVALID_TIER",
                              violations={"tier": "TIER_POOLED, TIER_BRIDGE or TIER_SILO"}) from None


class TenantLifecycle:
    """Inventory and purge of one tenant's rows in one service's database."""

    def __init__(self, service: str, db: Database, metadata: MetaData | Sequence[MetaData], *,
                 hooks: Sequence[PurgeHook] = (), keep: Mapping[str, str] | None = None,
                 rows_tier: Tier | None = None, movers: Sequence[MoveHook] = ()) -> None:
        """keep: table -> why it is kept. rows_tier: where the rows live whatever the tenant's tier
        (identity keeps its own rows pooled). movers: what moves with the rows in a migration."""
        self._movers = tuple(movers)
        self.service = service
        self._db = db
        metadatas = [metadata] if isinstance(metadata, MetaData) else list(metadata)
        self._tables = [t for md in metadatas for t in md.sorted_tables if "tenant_id" in t.c]
        # What this service's migrations make in a tenant's own store (which other services may share).
        self._store_tables = [t.name for md in metadatas for t in md.sorted_tables if not t.info.get(REGION_MAIN)]
        self._hooks = tuple(hooks)
        self._keep = dict(keep or {})
        self._rows_tier = rows_tier
        unknown = set(self._keep) - {t.name for t in self._tables}
        if unknown:
            raise ValueError(f"{service}: kept tables {sorted(unknown)} have no tenant_id column")

    def _own(self, table: Table) -> bool:
        return bool(table.c.tenant_id.info.get(TENANT_COLUMN_INFO))

    async def _stores(self, tenant_id: str, tier: Tier) -> list[tuple[str, Route | None, list[Table]]]:
        """(store name, route or None when it does not exist, its tables) in a stable order."""
        tier = self._rows_tier or tier
        router = self._db.router
        # Tables marked REGION_MAIN (the security-events ledger) hold a tenant's rows in its region's main
        # database whatever its tier; other tenant-owned ones go where the tier router puts it.
        regional = [t for t in self._tables if t.info.get(REGION_MAIN)]
        own = [t for t in self._tables if self._own(t) and t not in regional]
        platform = [t for t in self._tables if not self._own(t) and t not in regional]
        out: list[tuple[str, Route | None, list[Table]]] = []
        # Data residency: the tenant's region's main database holds its pooled rows; platform tables
        # stay in the default region's (shared/db/router.py).
        home = await router.main_route(tenant_id) if self._rows_tier is None else Route(self._db.engine)
        name = router.store_name(tenant_id, tier.value, home.region or None)
        at_home = home.bind is self._db.engine
        if name is None and at_home:
            out.append((MAIN_STORE, Route(self._db.engine), platform + regional + own))
        elif name is None:
            out.append((MAIN_STORE, Route(self._db.engine), platform))
            out.append((f"{home.region}/{MAIN_STORE}", home, regional + own))
        else:
            out.append((MAIN_STORE, Route(self._db.engine), platform + (regional if at_home else [])))
            if not at_home and regional:
                out.append((f"{home.region}/{MAIN_STORE}", home, regional))
            out.append((name, await router.existing(tenant_id, tier.value), own))
        return out

    async def inventory(self, tenant_id: str, tier: Tier) -> list[TableCount]:
        """Rows and checksum per table; a store that does not exist counts as empty (never created)."""
        out = []
        for store, route, tables in await self._stores(tenant_id, tier):
            if route is None:
                out.extend(TableCount(store, t.name, 0) for t in tables)
                continue
            async with raw_transaction(route.bind, tenant_id=tenant_id, schema=route.schema) as tx:
                for table in tables:
                    out.append(await _count(tx, store, table, tenant_id))
        return out

    async def purge(self, tenant_id: str, tier: Tier) -> PurgeResult:
        """Hooks (keys first), then every row: deleted, or its whole store dropped; kept tables stay."""
        hooks = HookResult()
        for hook in self._hooks:
            done = await hook.before_rows(tenant_id, tier)
            hooks.destroyed_keys.extend(done.destroyed_keys)
            hooks.actions.extend(done.actions)
        deleted: list[TableCount] = []
        dropped: list[str] = []
        kept: list[tuple[TableCount, str]] = []
        for store, route, tables in await self._stores(tenant_id, tier):
            if route is None:
                continue
            async with raw_transaction(route.bind, tenant_id=tenant_id, schema=route.schema, write=True) as tx:
                counts = {t.name: await _count(tx, store, t, tenant_id) for t in tables}
                main = store == MAIN_STORE or store.endswith(f"/{MAIN_STORE}")  # another region's main
                drop_whole = not main and not any(t.name in self._keep for t in tables)
                for table in reversed(tables):  # children before parents
                    if table.name in self._keep:
                        kept.append((counts[table.name], self._keep[table.name]))
                    elif not drop_whole:
                        rows = await tx.execute(f"DELETE FROM {_quote(table.name)} WHERE tenant_id = $1", tenant_id)
                        deleted.append(TableCount(store, table.name, rows, counts[table.name].checksum))
            if drop_whole:
                deleted.extend(counts[t.name] for t in reversed(tables))
                name = await self._db.router.drop(tenant_id, (self._rows_tier or tier).value,
                                                  tables=self._store_tables)
                if name:
                    dropped.append(name)
        log.info("%s: purged tenant %s (%d rows, %d stores dropped, %d keys destroyed)", self.service, tenant_id,
                 sum(d.rows for d in deleted), len(dropped), len(hooks.destroyed_keys))
        return PurgeResult(hooks, deleted, dropped, kept)


    # --- live migration (tier, region or both) ------------------------------------------------

    def _moving(self) -> list[Table]:
        """The tables a tier migration moves: tenant-owned, outside the main database's fixed places
        (platform tables and REGION_MAIN ledgers stay where they are whatever the tier)."""
        return [t for t in self._tables if self._own(t) and not t.info.get(REGION_MAIN)]

    def _regional(self) -> list[Table]:
        """The REGION_MAIN tables (the tenant's rows in its region's main database whatever its tier): they
        move too when the region changes."""
        return [t for t in self._tables if t.info.get(REGION_MAIN)]

    async def _groups(self, tenant_id: str, at: Placement, *, create: bool,
                      region_move: bool) -> list[tuple[str, Route | None, list[Table]]]:
        """(store name, route or None when it does not exist and `create` is False, tables) of what a move
        carries at one side `at`: the moving tables in the tier's store, and on a move between regions the
        REGION_MAIN tables in the region's main database."""
        router = self._db.router
        home = await router.main_route(tenant_id, at.region or None)
        main_name = f"{home.region}/{MAIN_STORE}" if home.bind is not self._db.engine else MAIN_STORE
        name = router.store_name(tenant_id, at.tier.value, home.region or None)
        if name is None:
            out = [(main_name, home, self._moving())]
        elif create:
            out = [(name, await router.route(tenant_id, at.tier.value, at.region or None), self._moving())]
        else:
            out = [(name, await router.existing(tenant_id, at.tier.value, at.region or None), self._moving())]
        if region_move and self._regional():
            out.append((main_name, home, self._regional()))
        return out

    async def _sides(self, tenant_id: str, source: Placement, target: Placement) -> tuple[Placement, Placement]:
        """Both sides with their regions filled in (empty = the tenant's region now) and checked to differ."""
        router = self._db.router
        here = await router.region_of(tenant_id)
        src = Placement(source.tier, router.check_region(source.region) if source.region else here)
        dst = Placement(target.tier, router.check_region(target.region) if target.region else src.region)
        if src == dst:
            raise InvalidArgument("target_tier and target_region are where the tenant is", reason="SAME_TIER",
                                  violations={"target_tier": "a tier or region other than tier and region"})
        return src, dst

    async def copy(self, tenant_id: str, source: Tier | Placement, target: Tier | Placement, *,
                   pause_seconds: float) -> CopyResult:
        """Pause the tenant's requests in this process, wait for its transactions in flight, then make the
        target store hold exactly the source's rows of every moving table (its earlier rows there, e.g. of
        an aborted attempt, are replaced): a re-run after a crash ends in the same state."""
        source, target = await self._sides(tenant_id, Placement.of(source), Placement.of(target))
        router = self._db.router
        started = time.monotonic()
        router.pause(tenant_id, pause_seconds)
        if not await router.drain(tenant_id, timeout=min(pause_seconds, DRAIN_TIMEOUT_S)):
            router.resume(tenant_id)
            raise Unavailable("the tenant's requests in flight did not finish; nothing was copied, retry",
                              reason="TENANT_BUSY", retry_after=1.0)
        if self._rows_tier is not None:  # identity: its rows stay where they are
            return CopyResult([], time.monotonic() - started)
        moves = source.region != target.region
        copied: list[TableCount] = []
        for (src_name, src, tables), (dst_name, dst, _) in zip(
                await self._groups(tenant_id, source, create=False, region_move=moves),
                await self._groups(tenant_id, target, create=True, region_move=moves), strict=True):
            if src_name != dst_name:  # the same on SQLite's bridge and silo: one file of the tenant's own
                await self._copy_rows(tenant_id, src, dst, tables)
            copied += await self._counts(dst_name, dst, tables, tenant_id)
        for mover in self._movers:
            copied += await mover.copy(tenant_id, source, target)
        log.info("%s: copied tenant %s %s -> %s (%d rows)", self.service, tenant_id, source, target,
                 sum(c.rows for c in copied))
        return CopyResult(copied, time.monotonic() - started)

    async def _copy_rows(self, tenant_id: str, src: Route | None, dst: Route | None, tables: list[Table]) -> None:
        rows: dict[str, list[Sequence[Any]]] = {}
        if src is not None:
            async with raw_transaction(src.bind, tenant_id=tenant_id, schema=src.schema) as tx:
                for table in tables:
                    # A surrogate id is left to the target's sequence (another tenant may hold the same
                    # number there); copying in its order keeps the rows' order.
                    rows[table.name] = await tx.fetch(f"SELECT {_columns(table)} FROM {_quote(table.name)} "
                                                      f"WHERE tenant_id = $1 ORDER BY {_order(table)}", tenant_id)
        assert dst is not None
        async with raw_transaction(dst.bind, tenant_id=tenant_id, schema=dst.schema, write=True) as tx:
            for table in reversed(tables):  # children before parents
                await tx.execute(f"DELETE FROM {_quote(table.name)} WHERE tenant_id = $1", tenant_id)
            for table in tables:
                batch = rows.get(table.name, [])
                if not batch:
                    continue
                marks = ", ".join(f"${i + 1}" for i in range(len(_kept_columns(table))))
                try:
                    await tx.executemany(f"INSERT INTO {_quote(table.name)} ({_columns(table)}) VALUES ({marks})",
                                         [tuple(r) for r in batch])
                except Exception as exc:
                    if "unique" in str(exc).lower() or "duplicate" in str(exc).lower():
                        raise FailedPrecondition(
                            f"{self.service}: a row id of the tenant's {table.name} is taken in the target store "
                            "by another tenant; nothing was copied", reason="ROW_ID_CONFLICT") from None
                    raise
                if tx.dialect == "postgresql":
                    await _advance_sequences(tx, table)

    async def _counts(self, store: str, route: Route | None, tables: list[Table], tenant_id: str) -> list[TableCount]:
        if route is None:
            return [TableCount(store, t.name, 0) for t in tables]
        async with raw_transaction(route.bind, tenant_id=tenant_id, schema=route.schema) as tx:
            return [await _count(tx, store, t, tenant_id) for t in tables]

    async def verify(self, tenant_id: str, source: Tier | Placement,
                     target: Tier | Placement) -> tuple[list[TableCount], list[TableCount]]:
        """The moving tables' rows and checksums in the source store and in the target store (creates nothing)."""
        source, target = await self._sides(tenant_id, Placement.of(source), Placement.of(target))
        if self._rows_tier is not None:
            return [], []
        moves = source.region != target.region
        out = []
        for side in (source, target):
            counts: list[TableCount] = []
            for name, route, tables in await self._groups(tenant_id, side, create=False, region_move=moves):
                counts += await self._counts(name, route, tables, tenant_id)
            out.append(counts)
        for mover in self._movers:
            left, right = await mover.verify(tenant_id, source, target)
            out[0] += left
            out[1] += right
        return out[0], out[1]

    def switch(self, tenant_id: str, tier: Tier, region: str = "") -> None:
        """Route the tenant to `tier` (and `region`, when given) in this process from now on (the token's claim
        no longer routes it) and serve its requests again: the migration's switch, or its abort (back to the
        source)."""
        self._db.router.place(tenant_id, tier.value, region)
        self._db.router.resume(tenant_id)

    async def release(self, tenant_id: str, tier: Tier | Placement, current: Tier | Placement) -> list[TableCount]:
        """Delete the tenant's moving rows at `tier` (where it left), or drop that store whole; refused
        while this process still routes the tenant there. Idempotent."""
        router = self._db.router
        here = await router.region_of(tenant_id)
        left, now = Placement.of(tier), Placement.of(current)
        now = Placement(now.tier, router.check_region(now.region) if now.region else here)
        left = Placement(left.tier, router.check_region(left.region) if left.region else now.region)
        if left == now:
            raise InvalidArgument("current_tier and current_region are what the tenant left", reason="SAME_TIER",
                                  violations={"current_tier": "a tier or region other than tier and region"})
        if router.placed_tier(tenant_id, "") != now.tier.value or here != now.region:
            raise FailedPrecondition("the tenant is not switched to current_tier (current_region) in this service; "
                                     "switch first", reason="NOT_SWITCHED")
        if self._rows_tier is not None:
            return []
        moves = left.region != now.region
        kept = {name for name, _, _ in await self._groups(tenant_id, now, create=False, region_move=moves)}
        deleted: list[TableCount] = []
        for name, route, tables in await self._groups(tenant_id, left, create=False, region_move=moves):
            if route is None or name in kept:
                continue
            counts = await self._counts(name, route, tables, tenant_id)
            if name.rpartition("/")[2] == MAIN_STORE:
                async with raw_transaction(route.bind, tenant_id=tenant_id, schema=route.schema, write=True) as tx:
                    for table in reversed(tables):
                        await tx.execute(f"DELETE FROM {_quote(table.name)} WHERE tenant_id = $1", tenant_id)
            else:
                await router.drop(tenant_id, left.tier.value, left.region, tables=self._store_tables)
            deleted += [c for c in counts if c.rows]
        for mover in self._movers:
            deleted += await mover.release(tenant_id, left, now)
        return deleted


@dataclass(frozen=True)
class Placement:
    """One side of a migration: a tier in a region ("" = the tenant's region now)."""

    tier: Tier
    """The isolation tier."""
    region: str = ""
    """The data-residency region."""

    @classmethod
    def of(cls, value: Tier | Placement) -> Placement:
        """A Placement of a bare tier (in the tenant's region now) or of a Placement."""
        return value if isinstance(value, Placement) else cls(value)

    def __str__(self) -> str:
        return f"{self.tier.value}@{self.region}" if self.region else self.tier.value


DRAIN_TIMEOUT_S = 10.0
"""How long a copy waits for the tenant's transactions in flight before giving up (UNAVAILABLE)."""


@dataclass
class CopyResult:
    """What one CopyTenant left in the target store."""

    copied: list[TableCount]
    """The target's rows and checksums per moving table after the copy."""
    paused_seconds: float
    """How long the tenant's requests have been paused in this process so far."""


def surrogate_key(table: Table) -> Column | None:
    """The table's surrogate id: a lone auto-incrementing integer primary key (its number means nothing
    outside its store: a copy gets a new one, and checksums leave it out), else None."""
    pk = list(table.primary_key.columns)
    if len(pk) != 1 or pk[0].name == "tenant_id" or not isinstance(pk[0].type, Integer):
        return None
    return pk[0] if pk[0].autoincrement in (True, "auto") else None


def _kept_columns(table: Table) -> list[Column]:
    """The columns a copy carries and a checksum covers: all but a surrogate id."""
    skip = surrogate_key(table)
    return [c for c in table.columns if c is not skip]


def _columns(table: Table) -> str:
    return ", ".join(_quote(c.name) for c in _kept_columns(table))


def _order(table: Table) -> str:
    order = [c.name for c in table.primary_key.columns] or [c.name for c in table.columns]
    return ", ".join(_quote(c) for c in order)


async def _advance_sequences(tx, table: Table) -> None:
    """Move a serial primary key's sequence past the copied ids (the app role may call nextval, not setval)."""
    for column in table.primary_key.columns:
        if not column.autoincrement or column.name == "tenant_id":
            continue
        seq = await tx.fetchval("SELECT pg_get_serial_sequence($1, $2)", _quote(table.name), column.name)
        if not seq:
            continue
        top = await tx.fetchval(f"SELECT max({_quote(column.name)}) FROM {_quote(table.name)}")
        last = await tx.fetchval(f"SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {seq}")
        if top is not None and top > last:
            await tx.fetchval("SELECT count(nextval($1::regclass)) FROM generate_series(1, $2::bigint)",
                              seq, top - last)


async def _count(tx, store: str, table: Table, tenant_id: str) -> TableCount:
    rows = await tx.fetch(f"SELECT {_columns(table)} FROM {_quote(table.name)} WHERE tenant_id = $1 "
                          f"ORDER BY {_order(table)}", tenant_id)
    if not rows:
        return TableCount(store, table.name, 0)
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([_plain(v) for v in row], separators=(",", ":")).encode())
        digest.update(b"\n")
    return TableCount(store, table.name, len(rows), digest.hexdigest())


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _plain(value: Any) -> Any:
    """A JSON-safe, dialect-stable form of a column value (for checksums only)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _table_pb(c: TableCount) -> pb.TableInventory:
    return pb.TableInventory(store=c.store, table=c.table, rows=c.rows, checksum=c.checksum)


class TenantLifecycleServicer(lifecycle_pb2_grpc.TenantLifecycleServiceServicer):
    """TenantLifecycleService over a TenantLifecycle: proto in, domain call, proto out."""

    def __init__(self, lifecycle: TenantLifecycle) -> None:
        self._lifecycle = lifecycle

    def follow_migration_feed(self, feed) -> None:
        """Let identity's published migration pauses and placements route this service's tenants on this
        replica too (shared.server.serve calls it; identity's own rows stay where they are)."""
        if self._lifecycle._rows_tier is None:
            self._lifecycle._db.router.follow(feed)

    async def InventoryTenant(self, request, context):
        tier = check_request(request.tenant_id, request.tier)
        tables = await self._lifecycle.inventory(request.tenant_id, tier)
        return pb.InventoryTenantResponse(service=self._lifecycle.service, tables=[_table_pb(t) for t in tables])

    async def PurgeTenant(self, request, context):
        tier = check_request(request.tenant_id, request.tier)
        return purge_pb(self._lifecycle.service, await self._lifecycle.purge(request.tenant_id, tier))

    async def CopyTenant(self, request, context):
        source = Placement(check_request(request.tenant_id, request.tier), check_region(request.region, "region"))
        target = Placement(check_tier(request.target_tier, "target_tier"),
                           check_region(request.target_region, "target_region"))
        if not 0 <= request.pause_seconds <= MAX_PAUSE_S:
            raise InvalidArgument(f"pause_seconds must be 0..{MAX_PAUSE_S}", reason="PAUSE_OUT_OF_RANGE",
                                  violations={"pause_seconds": f"0 (= {DEFAULT_PAUSE_S}) to {MAX_PAUSE_S}"})
        done = await self._lifecycle.copy(request.tenant_id, source, target,
                                          pause_seconds=request.pause_seconds or DEFAULT_PAUSE_S)
        return pb.CopyTenantResponse(service=self._lifecycle.service, copied=[_table_pb(t) for t in done.copied],
                                     paused_seconds=done.paused_seconds)

    async def VerifyTenant(self, request, context):
        source = Placement(check_request(request.tenant_id, request.tier), check_region(request.region, "region"))
        target = Placement(check_tier(request.target_tier, "target_tier"),
                           check_region(request.target_region, "target_region"))
        left, right = await self._lifecycle.verify(request.tenant_id, source, target)
        bad = [a.table for a, b in zip(left, right, strict=True) if (a.rows, a.checksum) != (b.rows, b.checksum)]
        return pb.VerifyTenantResponse(service=self._lifecycle.service, source=[_table_pb(t) for t in left],
                                       target=[_table_pb(t) for t in right], equal=not bad, mismatched_tables=bad)

    async def SwitchTenant(self, request, context):
        tier = check_request(request.tenant_id, request.tier)
        self._lifecycle.switch(request.tenant_id, tier, check_region(request.region, "region"))
        return pb.SwitchTenantResponse(service=self._lifecycle.service, tier=request.tier)

    async def ReleaseTenant(self, request, context):
        left = Placement(check_request(request.tenant_id, request.tier), check_region(request.region, "region"))
        current = Placement(check_tier(request.current_tier, "current_tier"),
                            check_region(request.current_region, "current_region"))
        deleted = await self._lifecycle.release(request.tenant_id, left, current)
        return pb.ReleaseTenantResponse(service=self._lifecycle.service, deleted=[_table_pb(t) for t in deleted])


DEFAULT_PAUSE_S = 30
"""How long a CopyTenant pauses the tenant at most when the request does not say."""
MAX_PAUSE_S = 120
"""The longest pause a CopyTenant may ask for."""


def check_tier(value: int, name: str) -> Tier:
    """A second tier field of a lifecycle request (target_tier, current_tier): set and known."""
    try:
        if value == tenancy_pb2.TIER_UNSPECIFIED:
            raise UnknownTier(value)
        return tier_from_proto(value)
    except UnknownTier:
        raise InvalidArgument(f"{name} must be set to a known tier", reason="INVALID_TIER",
                              violations={name: "TIER_POOLED, TIER_BRIDGE or TIER_SILO"}) from None


_REGION = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


def check_region(value: str, name: str) -> str:
    """A region field of a lifecycle request: empty (the tenant's region now) or a region-shaped name (whether
    this service has a database for it is the router's to say: REGION_NOT_CONFIGURED)."""
    if value and not _REGION.match(value):
        raise InvalidArgument(f"{name} is not a region name", reason="UNKNOWN_REGION",
                              violations={name: "empty, or a region of BULKHEAD_REGIONS such as eu"})
    return value


def purge_pb(service: str, result: PurgeResult) -> pb.PurgeTenantResponse:
    """The PurgeTenantResponse of a PurgeResult (identity also uses it for its own step)."""
    return pb.PurgeTenantResponse(
        service=service,
        destroyed_keys=[pb.DestroyedKey(key_id=k, backend=b) for k, b in result.hooks.destroyed_keys],
        deleted=[_table_pb(t) for t in result.deleted], dropped_stores=result.dropped,
        kept=[pb.KeptData(store=c.store, table=c.table, rows=c.rows, reason=why) for c, why in result.kept],
        actions=[pb.PurgeAction(name=n, count=c) for n, c in result.hooks.actions])


def lifecycle_binding(service: str, db: Database, metadata: MetaData | Sequence[MetaData], *,
                      hooks: Sequence[PurgeHook] = (), keep: Mapping[str, str] | None = None,
                      rows_tier: Tier | None = None, movers: Sequence[MoveHook] = ()) -> Binding:
    """The TenantLifecycleService binding a service adds to its server (one line in server.py)."""
    lifecycle = TenantLifecycle(service, db, metadata, hooks=hooks, keep=keep, rows_tier=rows_tier, movers=movers)
    return Binding(lifecycle_pb2_grpc.add_TenantLifecycleServiceServicer_to_server,
                   TenantLifecycleServicer(lifecycle), pb.DESCRIPTOR.services_by_name["TenantLifecycleService"])
