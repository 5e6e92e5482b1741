"""Alembic environment of the state service: shared.db runs it against the state tables."""

from services.state.store import StateBase
from shared.db.migrations import run_env

run_env(StateBase.metadata)
