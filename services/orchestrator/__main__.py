"""python -m services.orchestrator"""

from services.orchestrator.server import main
from shared.process import run_loop

run_loop(main)
