"""Alembic environment of the security-events ledger, run against every service's main database."""

from shared.db.migrations import run_env
from shared.security_events._store import METADATA

run_env(METADATA)
