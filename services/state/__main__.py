"""Run the state service: python -m services.state."""

from __future__ import annotations

import asyncio

from services.state.server import main

asyncio.run(main())
