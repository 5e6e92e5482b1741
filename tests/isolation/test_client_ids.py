"""Client-chosen identifiers never dedupe, or replay a reply, across tenants (issue 15, item 3).

For every keyed write (found from the descriptors, see reuse.py): B writes with key K and request
id R; then A sends the same K with the same R. A's reply must look exactly like A's reply for a
fresh key (no dedupe against B, none of B's values); A's write must show in A's listings whenever
B's showed in B's; B's listings must not move.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import defaultdict

import pytest

from .methods import enumerate_rpcs
from .observe import snapshot
from .reuse import (
    KEYED,
    NAMES_EXISTING,
    Reuse,
    call,
    id_fields,
    keyed_rpcs,
    made_values,
    request_id_only,
    skeleton,
    strings,
    unclassified,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

RPCS = enumerate_rpcs()
_BY_PATH = {r.path: r for r in RPCS}
CASES = {**KEYED, **request_id_only(RPCS)}
VISIBLE: dict[str, bool] = {}
"""Path -> whether B's write showed in B's listings (so A's must show in A's)."""


def _name(path: str) -> str:
    return path.rsplit("/", 1)[1]


QUIET_S = 1.5
"""How long a changed listing must hold still to count as settled: the proxy hands a call's budget lease back
to metering about half a second after the call (BULKHEAD_INFERENCE_LEASE_IDLE_SECONDS), which moves the quota
status again; read before that, it moved later, during A's call, as if A had changed B's listings."""


async def _settled(rig, service: str, tenant, before, *, wait: float) -> dict:
    """The tenant's listings once they differ from before and then hold still for QUIET_S (writes may land
    asynchronously, in steps), or after wait."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    last, still_since = None, loop.time()
    while True:
        now = await snapshot(rig.channels, service, tenant.metadata)
        if now != last:
            last, still_since = now, loop.time()
        if loop.time() > deadline or (now != before and loop.time() - still_since >= QUIET_S):
            return now
        await asyncio.sleep(0.05)


async def _readback(rig, case: Reuse, key: str, own: dict, out, tenant):
    """The case's read of a write as tenant (None when the case has none)."""
    if case.readback is None:
        return None
    path, request = case.readback(key, own, out.replies[0])
    return await call(rig, _BY_PATH[path], request, tenant, f"rid-{secrets.token_hex(8)}")


async def reuse_check(rig, path: str, case: Reuse) -> list[str]:
    """B first, then A with the same key and request id: what went wrong (empty when nothing did)."""
    rpc, key = _BY_PATH[path], f"reuse-{secrets.token_hex(5)}"
    service, rid = case.observe or rpc.service, f"rid-{secrets.token_hex(8)}"
    wait = 5.0 if case.observe else 0.0  # usage reaches metering through the proxy's outbox
    own = {}
    for tenant in (rig.b, rig.a):
        own[tenant.tenant_id] = await case.prepare(rig, tenant, key) if case.prepare else {}
    b_before = await snapshot(rig.channels, service, rig.b.metadata)
    b_req = case.build(key, own[rig.b.tenant_id])
    b_out = await call(rig, rpc, b_req, rig.b, rid)
    if b_out.code != "OK":
        return [f"B's own first use of the key failed: {b_out.status} {b_out.message!r}"]
    b_after = await _settled(rig, service, rig.b, b_before, wait=wait)
    b_read = await _readback(rig, case, key, own[rig.b.tenant_id], b_out, rig.b)

    a_before = await snapshot(rig.channels, service, rig.a.metadata)
    a_req = case.build(key, own[rig.a.tenant_id])
    a_out = await call(rig, rpc, a_req, rig.a, rid)
    a_after = await _settled(rig, service, rig.a, a_before, wait=wait if b_after != b_before else 0.0)
    b_final = await snapshot(rig.channels, service, rig.b.metadata)
    a_read = await _readback(rig, case, key, own[rig.a.tenant_id], a_out, rig.a) if a_out.code == "OK" else None
    b_read_final = await _readback(rig, case, key, own[rig.b.tenant_id], b_out, rig.b)
    fresh_key = f"fresh-{secrets.token_hex(5)}"
    fresh_own = await case.prepare(rig, rig.a, fresh_key) if case.prepare else {}
    control_req = case.build(fresh_key, fresh_own)
    control_rid = f"rid-{secrets.token_hex(8)}"
    control = await call(rig, rpc, control_req, rig.a, control_rid)

    if a_out.code != "OK":
        return [f"A's use of a key B used first failed: {a_out.status} {a_out.message!r}"]
    if control.code != "OK":
        return [f"A's call with a fresh key failed: {control.status} {control.message!r}"]
    problems = []
    a_sent, b_sent = strings(a_req), strings(b_req)
    mine = skeleton(a_out.replies[0], a_sent, case.vary, (key, rid))
    fresh = skeleton(control.replies[0], strings(control_req), case.vary, (fresh_key, control_rid))
    if case.compare and mine != fresh:
        problems.append(
            f"A's reply for B's key differs from A's reply for a fresh key (deduped against B?): {mine} vs {fresh}"
        )
    b_only = made_values(b_out.replies[0], b_sent, (key, rid)) - made_values(control.replies[0], set())
    leaked = sorted(v for v in b_only if v in made_values(a_out.replies[0], a_sent, (key, rid)))
    if leaked:
        problems.append(f"A's reply carries values B's call made: {leaked}")
    VISIBLE[path] = b_after != b_before or case.readback is not None
    if a_read is not None and a_read.code != "OK":
        problems.append(f"A's write is not found in A's space: {a_read.status} {a_read.message!r}")
    if b_read is not None and (b_read.code, b_read.replies) != (b_read_final.code, b_read_final.replies):
        problems.append("A's call changed what B reads back of its own write")
    if b_after != b_before and a_after == a_before:
        problems.append("B's write showed in B's listings but A's did not show in A's: it did not happen in A's space")
    if b_final != b_after:
        problems.append("A's call changed B's listings")
    return problems


async def test_every_keyed_write_is_classified():
    """A new write with an id-like field fails here, saying what to add (a Reuse or a reason)."""
    assert keyed_rpcs(RPCS), "no keyed writes found: the descriptor walk is broken"
    missing = unclassified(RPCS)
    assert not missing, "\n".join(missing)
    assert set(KEYED) | set(NAMES_EXISTING) <= {r.path for r in keyed_rpcs(RPCS)} | set(KEYED), (
        "an entry for an RPC that no longer exists or carries no id"
    )
    for path, case in KEYED.items():  # the key lands in the field the descriptors name as the client's id
        request = case.build("the-key", defaultdict(lambda: "x"))
        if case.key_field:
            assert case.key_field in id_fields(request.DESCRIPTOR), (path, case.key_field)
            value = request
            for part in case.key_field.split("."):
                value = getattr(value, part)
                value = value[0] if hasattr(value, "add") else value  # repeated messages: the first
            assert value == "the-key", (path, case.key_field, value)


@pytest.mark.parametrize("path", sorted(CASES), ids=_name)
async def test_a_key_used_by_another_tenant_first_is_still_the_callers_own(rig, path):
    """B uses the key (and request id) first; A's same key is a fresh write in A's space; B is untouched."""
    problems = await reuse_check(rig, path, CASES[path])
    assert not problems, f"{path}: " + "; ".join(problems)
    if path in KEYED:  # else "A's write happened in A's space" would hold for nothing
        assert VISIBLE[path], f"{path}: B's write shows in no listing; give its Reuse a readback"


_START_RUN, _CREATE_MESSAGE = (
    "/bulkhead.orchestrator.v1.OrchestratorService/StartRun",
    "/bulkhead.inference.v1.InferenceService/CreateMessage",
)


async def test_an_idempotency_key_deduplicated_across_tenants_fails_the_check(rig, monkeypatch):
    """StartRun made to find a run by its key in any tenant: the check names the dedupe and the lost write."""
    from dataclasses import replace

    from services.orchestrator.store import RunStore
    from shared.tenancy import require_tenant, tenant_scope

    original = RunStore.by_idempotency_key

    async def any_tenant(self, key):
        async with self._db.raw() as tx:  # no tenant in the WHERE: the bug under test
            owner = await tx.fetchval("SELECT tenant_id FROM orch_runs WHERE idempotency_key = $1", key)
        with tenant_scope(replace(require_tenant(), tenant_id=owner or require_tenant().tenant_id)):
            return await original(self, key)

    monkeypatch.setattr(RunStore, "by_idempotency_key", any_tenant)
    problems = " ".join(await reuse_check(rig, _START_RUN, KEYED[_START_RUN]))
    assert "A's reply carries values B's call made" in problems
    assert "did not happen in A's space" in problems


async def test_a_reply_replayed_across_tenants_fails_the_check(rig, monkeypatch):
    """The proxy's replay cache keyed by request id alone: A gets B's cached reply, and the check says so."""
    from services.inference.proxy import _ReplayCache

    for name in ("get", "put", "drop"):
        original = getattr(_ReplayCache, name)
        monkeypatch.setattr(_ReplayCache, name, lambda self, key, *rest, _o=original: _o(self, ("*", key[1]), *rest))
    problems = " ".join(await reuse_check(rig, _CREATE_MESSAGE, KEYED[_CREATE_MESSAGE]))
    assert "A's reply carries values B's call made" in problems


async def test_a_new_keyed_write_without_a_reuse_fails_saying_what_to_add():
    """A write RPC not listed (CreateThread's request under a new name): named, with its id fields and the fix."""
    from dataclasses import replace

    create = _BY_PATH["/bulkhead.state.v1.StateService/CreateThread"]
    new = replace(create, path="/bulkhead.state.v1.StateService/CreateThing")
    missing = unclassified([*RPCS, new])
    assert len(missing) == 1 and missing[0].startswith("/bulkhead.state.v1.StateService/CreateThing (fields thread_id")
    assert "add KEYED['/bulkhead.state.v1.StateService/CreateThing'] = Reuse(...)" in missing[0]
