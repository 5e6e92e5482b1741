"""Alembic environment of the state service: shared.db runs it against the state tables."""
from shared.db.migrations import run_env
from services.state.store import StateBase

run_env(StateBase.metadata)
