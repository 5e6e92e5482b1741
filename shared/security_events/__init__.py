"""The security-events contract, once: every service serves its own refused calls from its own ledger.

A service registers it with one line in its server.py::

    bindings=[binding, lifecycle, security_events_binding("state", db)]

and names the ledger's table to its lifecycle (`lifecycle_binding(..., [StateBase.metadata,
SECURITY_EVENTS_METADATA])`) so that a deletion inventories and purges it.
"""

from __future__ import annotations

from shared.security_events._service import (
    FLUSH_SECONDS,
    SCOPE,
    SERVED_BY,
    SecurityEventsFlush,
    SecurityEventsServicer,
    security_events_binding,
)
from shared.security_events._store import METADATA as SECURITY_EVENTS_METADATA
from shared.security_events._store import MIGRATIONS, RETENTION_S, TABLE, EventRow, Refusal, SecurityLedger

__all__ = [
    "FLUSH_SECONDS",
    "MIGRATIONS",
    "RETENTION_S",
    "SCOPE",
    "SECURITY_EVENTS_METADATA",
    "SERVED_BY",
    "TABLE",
    "EventRow",
    "Refusal",
    "SecurityEventsFlush",
    "SecurityEventsServicer",
    "SecurityLedger",
    "security_events_binding",
]
