"""One statement in one round trip on Postgres: the reservation hot path without BEGIN and COMMIT.

db.raw() spends three round trips on a one-statement transaction (BEGIN with the tenant setting,
the statement, COMMIT). Here the statement runs on a pooled connection outside any explicit
transaction, so Postgres runs it as its own implicit transaction: atomic, committed when it
returns, rolled back whole when it fails. The statement must itself set `app.tenant_id` (the
metering functions of migration 0008 do, transaction-locally, as their first step), so row-level
security confines it as it confines db.raw(); the connection keeps nothing of it afterwards.

Errors as db.raw(): a refused connect, or a connection lost while the statement ran (whose
outcome is then unknown), is UNAVAILABLE; a connection the statement did not leave clean is
thrown away rather than handed back to the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.db.raw import autocommit_fetch
from shared.db.rls import quote_ident
from shared.tenancy import require_tenant

_PLACEHOLDERS = tuple(", ".join(f"${i}" for i in range(1, n + 1)) for n in range(33))
"""`$1, .., $n` for n = 0..32 (a constant: built once, not per call)."""


def _select(schema: str | None, function: str, arity: int) -> str:
    """The call's SQL; a bridge tenant's function is its schema's own (pinned to that schema's tables)."""
    name = f"{quote_ident(schema)}.{function}" if schema else function
    return f"SELECT * FROM {name}({_PLACEHOLDERS[arity]})"


async def call(db: Any, function: str, *args: Any) -> list[Sequence[Any]]:
    """`SELECT * FROM function($1, ..)` for the current tenant, in its store (schema or database), as one
    implicit transaction. `function` must set app.tenant_id itself (it is this service's own, by name)."""
    ctx = require_tenant()
    async with db.router.using(ctx.tenant_id, ctx.tier) as route:
        return await autocommit_fetch(route.bind, _select(route.schema, function, len(args)), *args)
