"""Token issuing and verification, and key discovery by kid."""

from __future__ import annotations

import contextlib
import time

import pytest

from shared.errors import Unauthenticated
from shared.tokens import RefreshingKeySource, SigningKey, StaticKeySource, TokenIssuer, TokenVerifier


def _pair():
    key = SigningKey.generate()
    return TokenIssuer(key), TokenVerifier(StaticKeySource({key.kid: key.public_key})), key


async def test_round_trip_keeps_every_claim():
    """What is issued is what is verified: tenant, principal, scopes, tier, actor and tags."""
    issuer, verifier, key = _pair()
    token, issued = issuer.issue(
        tenant_id="t_a",
        principal_id="agent:x",
        scopes={"a.b", "c.*"},
        tier="silo",
        actor_id="p_admin",
        agent_id="x",
        run_id="r1",
    )
    claims = await verifier.verify(token)
    assert claims == issued and claims.kid == key.kid


async def test_tampered_payload_is_refused():
    """Changing the tenant inside a signed token breaks its signature."""
    import base64
    import json

    issuer, verifier, _ = _pair()
    token, _ = issuer.issue(tenant_id="t_a", principal_id="p", scopes={"*"})
    header, payload, sig = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=="))
    data["tid"] = "t_b"
    forged = ".".join([header, base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("="), sig])
    with pytest.raises(Unauthenticated) as info:
        await verifier.verify(forged)
    assert info.value.reason == "TOKEN_INVALID"


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda h, p, s: "not-a-token",
        lambda h, p, s: f"{_b64(b'[1, 2]')}.{p}.{s}",  # a header that is no JSON object
        lambda h, p, s: f"{_b64(b'{not json')}.{p}.{s}",
        lambda h, p, s: _b64(b'{"alg": "EdDSA", "kid": 7}') + f".{p}.{s}",  # a kid that is no string
        lambda h, p, s: _b64(b'{"alg": "none"}') + f".{p}.",
        lambda h, p, s: f"{h}.{p}!!.{s}",  # junk in the payload segment
        lambda h, p, s: f"{h}.{p}",  # a segment missing
        lambda h, p, s: f"{h}.{p}.{s}, Bearer {h}.{p}.{s}",  # two tokens joined
        lambda h, p, s: f"{h}é.{p}.{s}",
    ],
)
async def test_a_token_that_is_no_well_formed_jws_is_malformed(mangle):
    """The key is chosen from a header read without PyJWT; whatever is wrong anywhere in the token is still
    TOKEN_MALFORMED, never a verified claim."""
    issuer, verifier, _ = _pair()
    token, _ = issuer.issue(tenant_id="t_a", principal_id="p", scopes={"*"})
    with pytest.raises(Unauthenticated) as info:
        await verifier.verify(mangle(*token.split(".")))
    assert info.value.reason == "TOKEN_MALFORMED"


@pytest.mark.parametrize("tid", ["t_a_b", "t_A", "T_a", "tenant", "t_", "t_a b"])
async def test_a_signed_token_for_a_malformed_tenant_id_is_refused(tid: str):
    """Verification binds only tenant ids that pass shared.ids' one rule, whoever signed the token."""
    issuer, verifier, _ = _pair()
    token, _ = issuer.issue(tenant_id=tid, principal_id="p", scopes={"*"})
    with pytest.raises(Unauthenticated) as info:
        await verifier.verify(token)
    assert info.value.reason == "TOKEN_INVALID"


async def test_cached_token_still_expires():
    """A verified token is cached, yet refused once its expiry passes."""
    issuer, _, key = _pair()
    now = [time.time()]
    verifier = TokenVerifier(StaticKeySource({key.kid: key.public_key}), clock=lambda: now[0])
    token, _ = issuer.issue(tenant_id="t_a", principal_id="p", scopes={"*"}, ttl=30, now=now[0])
    await verifier.verify(token)
    now[0] += 60
    with pytest.raises(Unauthenticated) as info:
        await verifier.verify(token)
    assert info.value.reason == "TOKEN_EXPIRED"


class CountingLoader:
    def __init__(self, keys):
        self.keys, self.loads = keys, 0

    async def load_keys(self):
        self.loads += 1
        return dict(self.keys)

    async def load_revocations(self, since):
        return since, {}

    async def load_suspended(self):
        return frozenset()


async def test_unknown_kid_refetches_at_most_once_per_interval():
    """A new kid triggers a refetch; a flood of forged kids does not become a flood of fetches."""
    issuer, _, key = _pair()
    loader = CountingLoader({key.kid: key.public_key})
    source = RefreshingKeySource(loader, min_refetch=60)
    verifier = TokenVerifier(source)
    token, _ = issuer.issue(tenant_id="t_a", principal_id="p", scopes={"*"})
    await verifier.verify(token)
    assert loader.loads == 1
    for _ in range(20):
        with pytest.raises(Unauthenticated):
            await verifier.verify(
                TokenIssuer(SigningKey.generate()).issue(tenant_id="t_a", principal_id="p", scopes={"*"})[0]
            )
    assert loader.loads == 1
    await source.close()


class SlowLoader(CountingLoader):
    async def load_keys(self):
        import asyncio

        await asyncio.sleep(0.05)
        return await super().load_keys()


async def test_concurrent_first_requests_all_wait_for_the_key_fetch():
    """Requests that arrive together before the keys are known all pass: they wait for the one fetch."""
    import asyncio

    issuer, _, key = _pair()
    loader = SlowLoader({key.kid: key.public_key})
    source = RefreshingKeySource(loader, min_refetch=60)
    verifier = TokenVerifier(source)
    tokens = [issuer.issue(tenant_id="t_a", principal_id=f"p{i}", scopes={"*"})[0] for i in range(10)]
    claims = await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert {c.principal_id for c in claims} == {f"p{i}" for i in range(10)} and loader.loads == 1
    await source.close()


async def test_unreachable_identity_is_unavailable_not_unauthenticated():
    """If keys cannot be fetched the caller is told to retry (UNAVAILABLE), not that its token is bad."""
    from shared.errors import Unavailable

    class Down(CountingLoader):
        async def load_keys(self):
            raise ConnectionError("identity down")

    issuer, _, _key = _pair()
    source = RefreshingKeySource(Down({}), min_refetch=0)
    with pytest.raises(Unavailable) as info:
        await TokenVerifier(source).verify(issuer.issue(tenant_id="t_a", principal_id="p", scopes={"*"})[0])
    assert info.value.reason == "KEYS_UNAVAILABLE"
    await source.close()


async def test_revocation_poller_stops_when_a_call_absorbs_its_cancellation():
    """grpc.aio can turn a cancel that lands mid-call into an ordinary error; the poller must still stop
    (it used to loop on, and the event loop's shutdown waited for it forever)."""
    import asyncio

    started = asyncio.Event()

    class AbsorbingLoader:
        async def load_keys(self):
            return {}

        async def load_revocations(self, since):
            started.set()
            with contextlib.suppress(asyncio.CancelledError):  # what grpc's invocation task does with a cancel
                await asyncio.sleep(10)
            raise RuntimeError("call cancelled")

        async def load_suspended(self):
            return frozenset()

    source = RefreshingKeySource(AbsorbingLoader(), revocation_poll=0.01)
    try:
        await source.get("kid")
        await started.wait()
        source._poller.cancel()
        await asyncio.wait({source._poller}, timeout=2)
        assert source._poller.done(), "the poller went on after its cancel was absorbed"
    finally:
        await source.close()


async def test_a_key_rotated_in_right_after_a_refetch_waits_for_the_next_one_instead_of_being_refused():
    """A token of a key identity published just after this process refetched (a second rotation, or a forged
    kid that triggered the refetch) is verified once the next refetch is allowed, not refused meanwhile."""
    import asyncio

    issuer, _, key = _pair()
    loader = CountingLoader({key.kid: key.public_key})
    source = RefreshingKeySource(loader, min_refetch=0.3)
    verifier = TokenVerifier(source)
    await verifier.verify(issuer.issue(tenant_id="t_a", principal_id="p", scopes={"*"})[0])
    rotated = SigningKey.generate()
    loader.keys[rotated.kid] = rotated.public_key
    tokens = [TokenIssuer(rotated).issue(tenant_id="t_a", principal_id=f"p{i}", scopes={"*"})[0] for i in range(5)]
    started = time.monotonic()
    claims = await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert {c.principal_id for c in claims} == {f"p{i}" for i in range(5)}
    assert loader.loads == 2 and time.monotonic() - started >= 0.2  # one refetch for all, when it was due
    await source.close()
