"""Run the identity service: `python -m services.identity`."""

from services.identity.server import main
from shared.process import run_loop

run_loop(main)
