"""Each service's database pool: one setting every data-plane service reads the same way, and what it opens."""

from __future__ import annotations

import pytest

from shared.config import ConfigError, ServiceConfig
from shared.placement import open_service_database


def test_busy_services_keep_more_connections_and_any_service_can_be_set(tmp_path):
    base = {"BULKHEAD_DATA_DIR": str(tmp_path)}
    pools = {name: ServiceConfig.from_env(name, base).database_pool for name in ("orchestrator", "state", "metering")}
    assert pools == {"orchestrator": 16, "state": 16, "metering": 5}
    tuned = ServiceConfig.from_env("metering", {**base, "BULKHEAD_METERING_DATABASE_POOL": "24"})
    assert (tuned.database_pool, tuned.database_overflow) == (24, 24)
    assert ServiceConfig.from_env("metering", base).database_overflow == 10  # SQLAlchemy's, for the small pool
    with pytest.raises(ConfigError, match="BULKHEAD_STATE_DATABASE_POOL must be positive"):
        ServiceConfig.from_env("state", {**base, "BULKHEAD_STATE_DATABASE_POOL": "0"})


async def test_the_service_database_is_opened_with_its_pool(tmp_path):
    config = ServiceConfig.from_env("state", {"BULKHEAD_DATA_DIR": str(tmp_path), "BULKHEAD_STATE_DATABASE_POOL": "7"})
    db = await open_service_database(config, migrations=None)
    try:
        pool = db.engine.sync_engine.pool
        assert (pool.size(), pool._max_overflow) == (7, 10)
    finally:
        await db.close()
