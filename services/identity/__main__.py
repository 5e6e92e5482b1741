import asyncio

from services.identity.server import main

asyncio.run(main())
