"""Alembic environment of the credentials service: shared.db runs it against the credentials tables."""

from services.credentials.store import CredentialsBase
from shared.db.migrations import run_env

run_env(CredentialsBase.metadata)
