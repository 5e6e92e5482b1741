from services.orchestrator.store import OrchestratorBase
from shared.db.migrations import run_env

run_env(OrchestratorBase.metadata)
