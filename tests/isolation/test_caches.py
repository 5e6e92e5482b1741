"""Every in-process cache is keyed by tenant: B tries to poison A's entry (issue 15, item 4).

Each poison check makes the same names in two fresh tenants, lets B fill the cache first, then
reads as A (and B again): each must get its own. Each is also run with the cache's key stripped
of the tenant (monkeypatched), where it must fail: the check can see a poisoned cache.
"""

from __future__ import annotations

import gc
import secrets

import pytest

from bulkhead.credentials.v1 import credentials_pb2 as cred
from bulkhead.inference.v1 import inference_pb2 as inf
from bulkhead.metering.v1 import metering_pb2 as met
from bulkhead.state.v1 import state_pb2 as st

from .cache_scan import ROOT, find_caches
from .caches import CACHES
from .factories import MODEL, message_params
from .matrix import invoke
from .methods import enumerate_rpcs

pytestmark = pytest.mark.asyncio(loop_scope="module")

_RPC = {r.path.rsplit("/", 1)[1]: r for r in enumerate_rpcs()}


async def _call(rig, method: str, request, metadata):
    rpc = _RPC[method]
    out = await invoke(rig.channels[rpc.service], rpc, request, metadata)
    # CreateMessage may be refused on purpose (the limits check): its callers look at the code themselves.
    assert out.code == "OK" or method == "CreateMessage", f"{method}: {out.status} {out.message!r}"
    return out


async def _pair(rig):
    """Two fresh tenants (nothing of theirs is cached yet): A, B."""
    return await rig.mesh.tenant(), await rig.mesh.tenant()


async def _own_model(rig, *tenants) -> str:
    """One private model name every tenant given may call (the platform policy allows none by default)."""
    name = f"own-{secrets.token_hex(3)}"
    for t in tenants:
        await _call(
            rig,
            "RegisterPrivateModel",
            inf.RegisterPrivateModelRequest(model=inf.PrivateModel(name=name, upstream_model="ft:claude-test:own")),
            t.metadata,
        )
    return name


def _envelopes():
    """The state service's Envelope (found in memory: the mesh does not expose it)."""
    from services.state.envelope import Envelope

    return [o for o in gc.get_objects() if isinstance(o, Envelope)]


# ---- the checks: each returns what went wrong ----------------------------------------------------


async def secrets_check(rig) -> list[str]:
    a, b = await _pair(rig)
    name, values = (
        f"same-{secrets.token_hex(4)}",
        {a.tenant_id: b"a-" + secrets.token_bytes(6), b.tenant_id: b"b-" + secrets.token_bytes(6)},
    )
    for t in (b, a):
        await _call(rig, "PutSecret", cred.PutSecretRequest(name=name, value=values[t.tenant_id]), t.metadata)
    problems = []
    for t in (b, b, a, a, b):  # B fills the caches, A reads, B again
        got = (await _call(rig, "GetSecret", cred.GetSecretRequest(name=name), t.metadata)).replies[0].value
        if got != values[t.tenant_id]:
            problems.append(f"{'A' if t is a else 'B'} read {got!r} for its secret {name!r}")
    return problems


async def rings_check(rig) -> list[str]:
    a, b = await _pair(rig)
    out = []
    for t in (b, a):
        ct = (await _call(rig, "Encrypt", cred.EncryptRequest(plaintext=t.tenant_id.encode()), t.metadata)).replies[0]
        out.append(ct.ciphertext)
    b_ct, a_ct = out
    problems = []
    got = await invoke(rig.channels["credentials"], _RPC["Decrypt"], cred.DecryptRequest(ciphertext=a_ct), a.metadata)
    if got.code != "OK" or got.replies[0].plaintext != a.tenant_id.encode():
        problems.append(f"A cannot decrypt its own ciphertext after B used its key: {got.status}")
    got = await invoke(rig.channels["credentials"], _RPC["Decrypt"], cred.DecryptRequest(ciphertext=b_ct), a.metadata)
    if got.code == "OK":
        problems.append("A decrypted B's ciphertext")
    return problems


async def policy_check(rig) -> list[str]:
    """The same private model name in A and B, mapped to different upstream models."""
    a, b = await _pair(rig)
    name = f"same-model-{secrets.token_hex(3)}"
    upstream = {t.tenant_id: f"ft:claude-test:{t.tenant_id}" for t in (a, b)}
    for t in (b, a):
        await _call(
            rig,
            "RegisterPrivateModel",
            inf.RegisterPrivateModelRequest(model=inf.PrivateModel(name=name, upstream_model=upstream[t.tenant_id])),
            t.metadata,
        )
    problems = []
    for t in (b, a, b):
        before = len(rig.upstream.calls)
        out = await _call(rig, "CreateMessage", inf.CreateMessageRequest(params=message_params(name)), t.metadata)
        sent = [c.body.get("model") for c in rig.upstream.calls[before:]]
        if out.code != "OK" or sent != [upstream[t.tenant_id]]:
            problems.append(f"{'A' if t is a else 'B'}'s call of {name!r} went upstream as {sent} ({out.status})")
    return problems


async def provider_key_check(rig) -> list[str]:
    """B stores its own provider key and uses it; A (who has none) must still call with the platform's."""
    a, b = await _pair(rig)
    key = f"sk-b-{secrets.token_hex(8)}"
    await _call(rig, "PutSecret", cred.PutSecretRequest(name="anthropic-api-key", value=key.encode()), b.metadata)
    problems, model = [], await _own_model(rig, a, b)
    for t in (b, a, b):
        before = len(rig.upstream.calls)
        await _call(rig, "CreateMessage", inf.CreateMessageRequest(params=message_params(model)), t.metadata)
        used = [_api_key(c.headers) for c in rig.upstream.calls[before:]]
        if (key in used) != (t is b) or not used:
            problems.append(f"{'A' if t is a else 'B'}'s call went upstream with keys {used}")
    return problems


def _api_key(headers: dict[str, str]) -> str | None:
    """The key a call reached the provider with (x-api-key, or the bearer newer SDKs send)."""
    auth = headers.get("authorization", "")
    return headers.get("x-api-key") or (auth[7:] if auth.lower().startswith("bearer ") else None)


def _budget(limit: int) -> met.Budget:
    return met.Budget(
        unit=met.BUDGET_UNIT_TOKENS, limit=limit, mode=met.BUDGET_MODE_HARD, period=met.BUDGET_PERIOD_MONTH
    )


async def _set_quota(rig, tenant_id: str, **quota) -> None:
    await _call(
        rig,
        "SetQuota",
        met.SetQuotaRequest(quota=met.Quota(tenant_id=tenant_id, **quota)),
        rig.mesh.identity.operator.metadata,
    )


async def budget_specs_check(rig) -> list[str]:
    """B's hard budget holds 1000 tokens, A's 5000; a 3000-token reservation: B refused first, then A held."""
    a, b = await _pair(rig)
    limits = {a.tenant_id: 5000, b.tenant_id: 1000}
    for t in (a, b):
        await _set_quota(rig, t.tenant_id, budgets=[_budget(limits[t.tenant_id])])
    problems = []
    for t, expect in ((b, "RESOURCE_EXHAUSTED"), (a, "OK"), (b, "RESOURCE_EXHAUSTED")):
        out = await invoke(
            rig.channels["metering"],
            _RPC["ReserveBudget"],
            met.ReserveBudgetRequest(model=MODEL, prompt_tokens=1500, max_output_tokens=1500),
            t.metadata,
        )
        if out.code != expect:
            problems.append(f"{'A' if t is a else 'B'}'s reservation: {out.status}, expected {expect}")
    return problems


async def limits_check(rig) -> list[str]:
    """B limited to one request a minute and held to it; A, unlimited, is not slowed by B's limits."""
    a, b = await _pair(rig)
    await _set_quota(rig, b.tenant_id, requests_per_minute=1)
    problems, codes, model = [], {}, await _own_model(rig, a, b)
    for who, t in (("B", b), ("B", b), ("A", a), ("A", a), ("A", a)):
        out = await _call(rig, "CreateMessage", inf.CreateMessageRequest(params=message_params(model)), t.metadata)
        codes.setdefault(who, []).append(out.code)
    if codes["B"] != ["OK", "RESOURCE_EXHAUSTED"]:
        problems.append(f"B's limit did not hold: {codes['B']}")
    if codes["A"] != ["OK"] * 3:
        problems.append(f"A was limited by B's quota: {codes['A']}")
    return problems


async def envelope_check(rig) -> list[str]:
    """The same thread id in A and B, each payload sealed with its own tenant's data key."""
    a, b = await _pair(rig)
    thread, payload = f"same-thread-{secrets.token_hex(3)}", {a.tenant_id: b"a-payload", b.tenant_id: b"b-payload"}
    for t in (b, a):
        await _call(rig, "CreateThread", st.CreateThreadRequest(thread_id=thread), t.metadata)
        await _call(
            rig,
            "AppendEvents",
            st.AppendEventsRequest(
                thread_id=thread, expected_version=0, events=[st.NewEvent(type="x", payload=payload[t.tenant_id])]
            ),
            t.metadata,
        )
    for envelope in _envelopes():  # read back as another replica would: keys unwrapped afresh, per tenant
        envelope.forget()
    problems = []
    for t in (a, b, a):  # A first: its keys are loaded from its own store, not found in memory
        out = await invoke(
            rig.channels["state"], _RPC["ReadEvents"], st.ReadEventsRequest(thread_id=thread), t.metadata
        )
        got = [e.payload for e in out.replies[0].events] if out.code == "OK" else out.status
        if got != [payload[t.tenant_id]]:
            problems.append(f"{'A' if t is a else 'B'} read {got} from its thread")
    return problems


# ---- the tests -----------------------------------------------------------------------------------


async def test_every_cache_in_services_and_shared_is_accounted_for():
    """The scan finds each cache; each is listed with its key and its poisoning test (a new one fails here)."""
    found = find_caches()
    assert len(found) > 30, "the scan finds too little: it is broken"
    new = sorted(found - set(CACHES))
    assert not new, (
        "caches with no entry: add CACHES['<path::name>'] = Entry(TENANT|UNIQUE|PLATFORM, '<key>', "
        "'<poisoning test>') in tests/isolation/caches.py for:\n  " + "\n  ".join(new)
    )
    assert not sorted(set(CACHES) - found), "entries for caches that no longer exist"
    for name, entry in CACHES.items():
        if entry.proof:
            path, _, test = entry.proof.partition("::")
            assert (ROOT / path).exists() and (not test or f"def {test}(" in (ROOT / path).read_text()), (
                f"{name}: its proof {entry.proof} does not exist"
            )


async def test_a_new_cache_is_found(tmp_path):
    """A dict attribute added to a service is found by the scan (and so fails the test above until listed)."""
    svc = tmp_path / "services" / "demo"
    svc.mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    (svc / "memo.py").write_text(
        "class Memo:\n    def __init__(self):\n        self._answers: dict[str, bytes] = {}\n"
        "        self._lock_by: dict[str, asyncio.Lock] = {}\n"
    )
    assert find_caches(tmp_path) == {"services/demo/memo.py::_answers"}


CHECKS = {
    "secrets": secrets_check,
    "rings": rings_check,
    "policy": policy_check,
    "provider_key": provider_key_check,
    "budget_specs": budget_specs_check,
    "limits": limits_check,
    "envelope": envelope_check,
}


async def test_secret_read_caches_are_per_tenant(rig):
    """Same secret name in A and B: B's reads fill the metadata and value caches, A reads its own."""
    assert await secrets_check(rig) == []


async def test_transit_key_rings_are_per_tenant(rig):
    """B's key ring loaded first: A still decrypts its own, never B's."""
    assert await rings_check(rig) == []


async def test_model_policy_cache_is_per_tenant(rig):
    """Same private model name in A and B: each call goes upstream as the caller's own model."""
    assert await policy_check(rig) == []


async def test_provider_key_cache_is_per_tenant(rig):
    """B's own provider key, cached by B's call, is never used for A's."""
    assert await provider_key_check(rig) == []


async def test_budget_spec_cache_is_per_tenant(rig):
    """B's budget specs cached first: A sees its own limit."""
    assert await budget_specs_check(rig) == []


async def test_limits_cache_is_per_tenant(rig):
    """B's one-request-a-minute limit, cached by B's calls, neither slows A nor lapses for B."""
    assert await limits_check(rig) == []


async def test_envelope_key_cache_is_per_tenant(rig):
    """B's data key cached first: A reads its own payload from a thread of the same id."""
    assert await envelope_check(rig) == []


_TENANT_CACHE = "shared.cache:TenantCache"
_TENANT_CACHE_METHODS = ("lookup", "put", "invalidate", "generation", "load")


def _drop_tenant(key):
    return ("*", *key[1:]) if isinstance(key, tuple) else "*"


@pytest.mark.parametrize(
    ("check", "target", "methods"),
    [
        ("secrets", _TENANT_CACHE, _TENANT_CACHE_METHODS),
        ("policy", _TENANT_CACHE, _TENANT_CACHE_METHODS),
        ("budget_specs", _TENANT_CACHE, _TENANT_CACHE_METHODS),
    ],
)
async def test_a_cache_keyed_without_the_tenant_fails_its_check(rig, monkeypatch, check, target, methods):
    """Each cache's key made to drop the tenant (one entry for everyone): its poisoning check fails."""
    import importlib

    module, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    for name in methods:
        original = getattr(cls, name)
        monkeypatch.setattr(
            cls, name, lambda self, tenant, *rest, _o=original, **kw: _o(self, _drop_tenant(tenant), *rest, **kw)
        )
    assert await CHECKS[check](rig) != []


async def test_a_provider_key_cache_keyed_without_the_tenant_fails_its_check(rig, monkeypatch):
    """CredentialsKeys answering every tenant from one entry: A's call uses B's key, and the check says so."""
    from dataclasses import replace

    from services.inference.peers import CredentialsKeys

    original = CredentialsKeys.tenant_key
    monkeypatch.setattr(CredentialsKeys, "tenant_key", lambda self, ctx: original(self, replace(ctx, tenant_id="*")))
    assert await provider_key_check(rig) != []


async def test_a_limits_cache_keyed_without_the_tenant_fails_its_check(rig, monkeypatch):
    """The proxy's limits cache shared by everyone: B's limit reaches A (or A's, B), and the check says so."""
    from shared.cache import TenantCache

    original = TenantCache.load
    monkeypatch.setattr(TenantCache, "load", lambda self, tenant_id, *rest, **kw: original(self, "*", *rest, **kw))
    assert await limits_check(rig) != []


class _OneSlot(dict):
    """A dict that files every key under one: a cache that forgot the tenant."""

    def get(self, key, default=None):
        return super().get("*", default)

    def __setitem__(self, key, value):
        super().__setitem__("*", value)


async def test_an_envelope_cache_keyed_without_the_tenant_fails_its_check(rig, monkeypatch):
    """State's data keys cached for everyone at once: A's payload is sealed with B's key, and the check says so."""
    from services.state.envelope import Envelope

    for envelope in _envelopes():
        monkeypatch.setattr(envelope, "_current", _OneSlot())
    for name in ("_cached", "_remember"):
        original = getattr(Envelope, name)
        monkeypatch.setattr(Envelope, name, lambda self, tenant, *rest, _o=original: _o(self, "*", *rest))
    assert await envelope_check(rig) != []


async def token_cache_check(verifier, tokens) -> list[str]:
    """A's token verified (so cached); then its signature under B's tenant claim, B's own token, A's again."""
    from shared.errors import Unauthenticated

    from . import forged

    a_tok, b_tok = tokens.mint("t_alpha"), tokens.mint("t_beta")
    problems = []
    if (await verifier.verify(a_tok)).tenant_id != "t_alpha":
        problems.append("A's token did not verify as A")
    try:
        claims = await verifier.verify(forged.tampered(a_tok, tid="t_beta"))
        problems.append(f"A's signature under B's tenant claim verified as {claims.tenant_id}")
    except Unauthenticated:
        pass
    for tok, tid in ((b_tok, "t_beta"), (a_tok, "t_alpha")):
        if (await verifier.verify(tok)).tenant_id != tid:
            problems.append(f"a token of {tid} verified as another tenant")
    return problems


async def test_token_cache_is_keyed_by_the_whole_signed_token():
    """The verifier's cache of verified tokens cannot be reached by another payload with A's signature."""
    from testkit.tokens import TestTokens

    tokens = TestTokens()
    assert await token_cache_check(tokens.verifier, tokens) == []


async def test_a_token_cache_keyed_by_signature_alone_fails_its_check():
    """Cached by signature only, A's claims answer the tampered token: the check says so."""
    from collections import OrderedDict

    from testkit.tokens import TestTokens

    class BySignature(OrderedDict):
        def get(self, key, default=None):
            return super().get(key.rsplit(".", 1)[-1], default)

        def __setitem__(self, key, value):
            super().__setitem__(key.rsplit(".", 1)[-1], value)

    tokens = TestTokens()
    tokens.verifier._cache = BySignature()
    assert await token_cache_check(tokens.verifier, tokens) != []
