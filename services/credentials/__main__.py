"""Run the credentials service: `python -m services.credentials`."""

from services.credentials.server import main
from shared.process import run_loop

run_loop(main)
