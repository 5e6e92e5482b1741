"""Alembic environment of the inference proxy: shared.db runs it against the inference tables."""

from services.inference.store import InferenceBase
from shared.db.migrations import run_env

run_env(InferenceBase.metadata)
