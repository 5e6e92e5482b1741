"""`python -m console`: the console on BULKHEAD_CONSOLE_ADDR (default 127.0.0.1:8080)."""

import sys

from console._server import serve

sys.exit(serve())
