"""The inference tables on Postgres as the runtime role: RLS confines policies and private models to their tenant."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from services.inference.budget import Tokens
from services.inference.policy import Policy, PrivateModel
from services.inference.server import MIGRATIONS
from services.inference.store import PolicyStore, SqlOutbox
from services.inference.usage import UsageEvent
from shared.db import Database
from shared.tenancy import TenantContext, tenant_scope

pytestmark = pytest.mark.postgres


async def test_policies_and_private_models_are_confined_by_rls(postgres):
    """Each tenant reads only its own policy and models, even with raw SQL; the outbox works for the app role."""
    urls = await postgres.create_database("inference")
    db = await Database.open(urls.app_url, migrations=str(MIGRATIONS), owner_url=urls.owner_url)
    store = PolicyStore(db)
    try:
        for tenant, model in (("t_a", "a-model"), ("t_b", "b-model")):
            with tenant_scope(TenantContext(tenant, "p")):
                await store.put_policy(Policy((model,), model, {}, 100))
                assert await store.add_private_model(PrivateModel(f"{tenant}-ft", "ft:1")) is not None
        with tenant_scope(TenantContext("t_a", "p")):
            assert (await store.policy()).allowed_models == ("a-model",)
            assert list(await store.private_models()) == ["t_a-ft"]
            async with db.session() as s:
                raw = (await s.execute(text("SELECT tenant_id FROM inference_private_models"))).scalars().all()
            assert raw == ["t_a"]
        outbox = SqlOutbox(db)
        event = UsageEvent("t_a", "req-1", "p", "", "", "m", Tokens(1, 2), 3, "success", time.time())
        await outbox.append([event])
        assert await outbox.tenants() == {"t_a"}
        ((row_id, got),) = await outbox.pending("t_a", 10)
        assert got == event
        await outbox.delete([row_id])
        assert await outbox.count() == 0
    finally:
        await db.close()
