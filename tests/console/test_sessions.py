"""Console sessions: token renewal before expiry, revocation on sign-out and idle expiry, operator sessions."""

from __future__ import annotations

import asyncio
import dataclasses

import jwt
from google.protobuf.timestamp_pb2 import Timestamp

from bulkhead.identity.v1 import identity_pb2 as idp
from console._sessions import RENEW_MARGIN, Sessions


class Clock:
    """A settable wall clock and monotonic clock."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class FakeIdentity:
    """IssueToken and RevokeToken as identity answers them, recording what the console asked."""

    clock: Clock
    tenant_id: str = "t_a"
    issued: int = 0
    revoked: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    async def IssueToken(self, request, timeout=None):  # the stub's name
        self.issued += 1
        token = jwt.encode({"sub": "p_1", "n": self.issued}, "a-key-the-console-never-checks-32b", algorithm="HS256")
        return idp.IssueTokenResponse(
            token=token,
            jti=f"j{self.issued}",
            tenant_id=self.tenant_id,
            scopes=["*"],
            expire_time=Timestamp(seconds=int(self.clock() + request.ttl_seconds)),
        )

    async def RevokeToken(self, request, metadata=None, timeout=None):
        self.revoked.append((request.jti, dict(metadata)["authorization"]))
        return idp.RevokeTokenResponse()


def _sessions(tenant_id: str = "t_a", **kwargs) -> tuple[Sessions, FakeIdentity, Clock]:
    clock = Clock()
    identity = FakeIdentity(clock, tenant_id)
    mesh = type("FakeMesh", (), {"identity": identity})()
    return Sessions(mesh, token_ttl=900, clock=clock, monotonic=clock, **kwargs), identity, clock


async def test_token_renewed_before_expiry_and_old_one_revoked():
    """Within RENEW_MARGIN of expiry the next call renews once (even when calls race) and revokes the old token."""
    sessions, identity, clock = _sessions()
    session = await sessions.sign_in("bk_key")
    first = dict(await sessions.metadata(session))["authorization"]
    assert identity.issued == 1 and session.renewals == 0
    clock.now += 900 - RENEW_MARGIN + 1
    md = await asyncio.gather(*(sessions.metadata(session, "req-1") for _ in range(5)))
    assert identity.issued == 2 and session.renewals == 1
    assert {dict(m)["authorization"] for m in md} == {f"Bearer {session.token}"} != {first}
    assert {dict(m)["x-request-id"] for m in md} == {"req-1"} and dict(md[0])["x-tenant-id"] == "t_a"
    assert identity.revoked == [("j1", first)]


async def test_sign_out_and_idle_sessions_revoke_their_tokens():
    """Sign-out revokes the token and forgets the session; an idle session is dropped and revoked on next use."""
    sessions, identity, clock = _sessions(idle=60)
    a = await sessions.sign_in("bk_a")
    await sessions.sign_out(a)
    assert sessions.get(a.sid) is None and identity.revoked[-1][0] == a.jti and a.api_key == ""
    b = await sessions.sign_in("bk_b")
    clock.now += 61
    assert sessions.get(b.sid) is None
    await asyncio.sleep(0)  # the revocation runs as its own task
    assert identity.revoked[-1][0] == b.jti and len(sessions) == 0


async def test_only_platform_sessions_are_operators():
    """A session is an operator's only when identity's answer names the platform tenant, whatever the key says."""
    tenant, _, _ = _sessions("t_a")
    platform, _, _ = _sessions("t_platform")
    assert not (await tenant.sign_in("bk_t_platform_lookalike")).operator
    assert (await platform.sign_in("bk_anything")).operator
