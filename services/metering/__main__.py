"""Run the metering service: `python -m services.metering`."""

import asyncio

from services.metering.server import main

asyncio.run(main())
