from services.identity.store import IdentityBase
from shared.db.migrations import run_env

run_env(IdentityBase.metadata)
