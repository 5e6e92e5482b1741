from services.metering.store import MeteringBase
from shared.db.migrations import run_env

run_env(MeteringBase.metadata)
