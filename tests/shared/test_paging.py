"""The one page-token codec: what a token is bound to, and the key every replica shares."""

from __future__ import annotations

import contextvars
from datetime import UTC, datetime

import pytest

from shared import paging
from shared.db import Database
from shared.errors import InvalidArgument
from shared.settings import load_page_key
from shared.tenancy import TenantContext, tenant_scope

KEY, OTHER_KEY = b"k" * 32, b"o" * 32
LIST_A, LIST_B = "/bulkhead.x.v1.X/ListA", "/bulkhead.x.v1.X/ListB"
CURSOR = {"t": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "id": "p_1"}


def _in(method: str, tenant: str, fn, *, key: bytes = KEY):
    """fn() inside a served call of method for tenant (what the interceptor binds)."""

    def run():
        paging.bind(method, key)
        with tenant_scope(TenantContext(tenant_id=tenant, principal_id="p")):
            return fn()

    return contextvars.copy_context().run(run)


def _refused(method: str, tenant: str, token: str, *, filters=("f",), key: bytes = KEY) -> None:
    with pytest.raises(InvalidArgument) as err:
        _in(method, tenant, lambda: paging.decode(token, filters=filters), key=key)
    assert err.value.reason == paging.REASON == "INVALID_PAGE_TOKEN"
    assert "restart listing from the first page" in err.value.message


def test_a_token_continues_its_own_listing():
    """The RPC, tenant and filters that issued a token get its cursor back (datetimes too); '' is the first page."""
    token = _in(LIST_A, "t_b", lambda: paging.encode(CURSOR, filters=("f",)))
    assert _in(LIST_A, "t_b", lambda: paging.decode(token, filters=("f",))) == CURSOR
    assert _in(LIST_A, "t_b", lambda: paging.decode("", filters=("f",))) is None


def test_a_token_is_bound_to_rpc_tenant_filters_and_key():
    """Same cursor, one thing different: another RPC, tenant, filter or service key refuses it."""
    token = _in(LIST_A, "t_b", lambda: paging.encode(CURSOR, filters=("f",)))
    _refused(LIST_B, "t_b", token)
    _refused(LIST_A, "t_a", token)
    _refused(LIST_A, "t_b", token, filters=("g",))
    _refused(LIST_A, "t_b", token, key=OTHER_KEY)


def test_every_altered_character_is_refused():
    """Changing any one character of a token, or cutting or extending it, is refused."""
    token = _in(LIST_A, "t_b", lambda: paging.encode(CURSOR, filters=("f",)))
    for i, ch in enumerate(token):
        _refused(LIST_A, "t_b", token[:i] + ("A" if ch != "A" else "B") + token[i + 1 :])
    for bad in (token[:-1], token + "A", token + "==", "%%%", "!!", "A"):
        _refused(LIST_A, "t_b", bad)


def test_page_size_is_one_rule():
    """0 is the default, large is capped, negative is INVALID_PAGE_SIZE."""
    assert (paging.page_size(0), paging.page_size(10_000), paging.page_size(0, default=7)) == (50, 500, 7)
    with pytest.raises(InvalidArgument) as err:
        paging.page_size(-1)
    assert err.value.reason == "INVALID_PAGE_SIZE"


async def _keys(url: str, owner_url: str | None = None) -> tuple[bytes, bytes, bytes]:
    first = await Database.open(url, owner_url=owner_url)
    try:
        made = await load_page_key(first, "state")
        other_service = await load_page_key(first, "metering")
    finally:
        await first.close()
    second = await Database.open(url, owner_url=owner_url)  # another replica, or the same after a restart
    try:
        again = await load_page_key(second, "state")
    finally:
        await second.close()
    return made, other_service, again


async def test_the_page_key_is_made_once_and_shared_on_sqlite(tmp_path):
    """Every replica and restart of a service reads the key the first one made; services differ."""
    made, other_service, again = await _keys(f"sqlite+aiosqlite:///{tmp_path / 'svc.db'}")
    assert len(made) == 32 and again == made and other_service != made


@pytest.mark.postgres
async def test_the_page_key_is_made_once_and_shared_on_postgres(postgres):
    """The same on Postgres, made by the table owner."""
    urls = await postgres.create_database("paging_key")
    made, other_service, again = await _keys(urls.app_url, urls.owner_url)
    assert len(made) == 32 and again == made and other_service != made
