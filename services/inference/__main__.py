"""Run the inference proxy: python -m services.inference."""
from __future__ import annotations

import asyncio

from services.inference.server import main

asyncio.run(main())
