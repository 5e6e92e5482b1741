"""Alembic environment of the inference proxy: shared.db runs it against the inference tables."""
from shared.db.migrations import run_env
from services.inference.store import InferenceBase

run_env(InferenceBase.metadata)
