"""Run the credentials service: `python -m services.credentials`."""

import asyncio

from services.credentials.server import main

asyncio.run(main())
