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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import MetaData, Table

from bulkhead.common.v1 import lifecycle_pb2 as pb
from bulkhead.common.v1 import lifecycle_pb2_grpc
from bulkhead.common.v1 import tenancy_pb2
from shared.db import Database
from shared.db.base import TENANT_COLUMN_INFO
from shared.db.raw import raw_transaction
from shared.db.router import Route
from shared.errors import FailedPrecondition, InvalidArgument
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
_TENANT_ID = re.compile(r"^t_[A-Za-z0-9_]{1,60}$")


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
    """Hex SHA-256 over those rows in primary-key order ("" when there are none)."""


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
    if not _TENANT_ID.match(tenant_id or ""):
        raise InvalidArgument("tenant_id is missing or malformed", reason="TENANT_ID_INVALID",
                              violations={"tenant_id": "a tenant id such as t_8k2f..."})
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
                 rows_tier: Tier | None = None) -> None:
        """keep: table -> why it is kept. rows_tier: where the rows live whatever the tenant's tier
        (identity keeps its own rows pooled)."""
        self.service = service
        self._db = db
        metadatas = [metadata] if isinstance(metadata, MetaData) else list(metadata)
        self._tables = [t for md in metadatas for t in md.sorted_tables if "tenant_id" in t.c]
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
                name = await self._db.router.drop(tenant_id, (self._rows_tier or tier).value)
                if name:
                    dropped.append(name)
        log.info("%s: purged tenant %s (%d rows, %d stores dropped, %d keys destroyed)", self.service, tenant_id,
                 sum(d.rows for d in deleted), len(dropped), len(hooks.destroyed_keys))
        return PurgeResult(hooks, deleted, dropped, kept)


async def _count(tx, store: str, table: Table, tenant_id: str) -> TableCount:
    order = [c.name for c in table.primary_key.columns] or [c.name for c in table.columns]
    cols = ", ".join(_quote(c.name) for c in table.columns)
    rows = await tx.fetch(f"SELECT {cols} FROM {_quote(table.name)} WHERE tenant_id = $1 "
                          f"ORDER BY {', '.join(_quote(c) for c in order)}", tenant_id)
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

    async def InventoryTenant(self, request, context):
        tier = check_request(request.tenant_id, request.tier)
        tables = await self._lifecycle.inventory(request.tenant_id, tier)
        return pb.InventoryTenantResponse(service=self._lifecycle.service, tables=[_table_pb(t) for t in tables])

    async def PurgeTenant(self, request, context):
        tier = check_request(request.tenant_id, request.tier)
        return purge_pb(self._lifecycle.service, await self._lifecycle.purge(request.tenant_id, tier))


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
                      rows_tier: Tier | None = None) -> Binding:
    """The TenantLifecycleService binding a service adds to its server (one line in server.py)."""
    lifecycle = TenantLifecycle(service, db, metadata, hooks=hooks, keep=keep, rows_tier=rows_tier)
    return Binding(lifecycle_pb2_grpc.add_TenantLifecycleServiceServicer_to_server,
                   TenantLifecycleServicer(lifecycle), pb.DESCRIPTOR.services_by_name["TenantLifecycleService"])
