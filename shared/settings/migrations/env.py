"""Alembic environment of the settings table, run against every service's main database."""

from shared.db.migrations import run_env
from shared.settings import METADATA

run_env(METADATA)
