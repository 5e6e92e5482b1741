"""Signed-in sessions, kept in this process's memory only: the cookie carries a random id, never a token."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc
import jwt

from bulkhead.identity.v1 import identity_pb2 as idp
from console._mesh import Mesh, call_metadata
from shared.tenancy import PLATFORM_TENANT

log = logging.getLogger("bulkhead.console")

RENEW_MARGIN = 60.0
"""Seconds before its expiry at which a session's token is renewed."""


class SignInFailed(Exception):
    """The API key was refused; str() is safe to show (it never repeats the key)."""


@dataclass
class Session:
    """One signed-in browser: its tenant's token and the API key that renews it (server-side only)."""

    sid: str
    """Random id carried by the cookie."""
    csrf: str
    """Token every state-changing request must echo."""
    tenant_id: str
    """The tenant the token names."""
    principal_id: str
    """The principal the key belongs to (from the token's own claims)."""
    token: str = field(repr=False)
    """The current bearer token."""
    jti: str
    """The current token's id, for RevokeToken."""
    expires_at: float
    """When the current token expires (epoch seconds)."""
    scopes: tuple[str, ...] = ()
    """What the token may do."""
    api_key: str = field(default="", repr=False)
    """Kept in memory to renew the token; never sent to the browser."""
    last_seen: float = 0.0
    """When the browser last used it (monotonic)."""
    renewals: int = 0
    """How often the token was renewed."""
    acting_for: str = ""
    """For an operator: the tenant picked to look at (its usage, through the audited operator RPCs)."""
    acting_for_name: str = ""
    """That tenant's name, for the header."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def operator(self) -> bool:
        """Signed in with a platform key: sees other tenants only through audited operator RPCs."""
        return self.tenant_id == PLATFORM_TENANT

    def check_csrf(self, offered: str | None) -> bool:
        """Whether a request carries this session's CSRF token."""
        if not offered:
            return False
        return hmac.compare_digest(offered, self.csrf)


class Sessions:
    """Session id -> Session; signs in with IssueToken, renews before expiry, revokes on sign-out."""

    def __init__(
        self,
        mesh: Mesh,
        *,
        token_ttl: int = 900,
        idle: float = 8 * 3600,
        max_sessions: int = 10_000,
        clock=time.time,
        monotonic=time.monotonic,
    ):
        self._mesh = mesh
        self._ttl = token_ttl
        self._idle = idle
        self._max = max_sessions
        self._clock = clock
        self._mono = monotonic
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    async def sign_in(self, api_key: str) -> Session:
        """Trade an API key for a token and open a session for it."""
        try:
            resp = await self._mesh.identity.IssueToken(
                idp.IssueTokenRequest(api_key=api_key, ttl_seconds=self._ttl), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.FAILED_PRECONDITION,
            ):
                raise SignInFailed("that API key was not accepted") from None
            raise
        claims = jwt.decode(resp.token, options={"verify_signature": False})  # display only; services verify
        session = Session(
            sid=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            tenant_id=resp.tenant_id,
            principal_id=str(claims.get("sub", "")),
            token=resp.token,
            jti=resp.jti,
            expires_at=float(resp.expire_time.seconds),
            scopes=tuple(resp.scopes),
            api_key=api_key,
            last_seen=self._mono(),
        )
        self._by_id[session.sid] = session
        while len(self._by_id) > self._max:
            _, oldest = self._by_id.popitem(last=False)
            await self._revoke(oldest)
        return session

    def get(self, sid: str | None) -> Session | None:
        """The live session with this id, or None (unknown, signed out or idle too long)."""
        session = self._by_id.get(sid or "")
        if session is None:
            return None
        now = self._mono()
        if now - session.last_seen > self._idle:
            self._by_id.pop(session.sid, None)
            asyncio.get_running_loop().create_task(self._revoke(session))
            return None
        session.last_seen = now
        self._by_id.move_to_end(session.sid)
        return session

    async def metadata(self, session: Session, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
        """Call metadata for the session, renewing its token first when it is about to expire.

        request_id: the page's, so a service's log or audit line names the page view that caused it.
        """
        if session.expires_at - self._clock() < RENEW_MARGIN:
            async with session.lock:
                if session.expires_at - self._clock() < RENEW_MARGIN:
                    await self._renew(session)
        return call_metadata(session.token, session.tenant_id, request_id)

    async def _renew(self, session: Session) -> None:
        old_jti, old_md = session.jti, call_metadata(session.token, session.tenant_id)
        resp = await self._mesh.identity.IssueToken(
            idp.IssueTokenRequest(api_key=session.api_key, ttl_seconds=self._ttl), timeout=10
        )
        session.token, session.jti = resp.token, resp.jti
        session.expires_at = float(resp.expire_time.seconds)
        session.renewals += 1
        if old_jti and session.expires_at > self._clock():  # the old token is no longer needed by anyone
            with contextlib.suppress(grpc.aio.AioRpcError):  # already expired or revoked: nothing to take back
                await self._mesh.identity.RevokeToken(idp.RevokeTokenRequest(jti=old_jti), metadata=old_md, timeout=5)

    async def sign_out(self, session: Session) -> None:
        """Forget the session and revoke its token."""
        self._by_id.pop(session.sid, None)
        await self._revoke(session)

    async def _revoke(self, session: Session) -> None:
        if not session.jti or session.expires_at <= self._clock():
            return
        try:
            await self._mesh.identity.RevokeToken(
                idp.RevokeTokenRequest(jti=session.jti),
                metadata=call_metadata(session.token, session.tenant_id),
                timeout=5,
            )
        except grpc.aio.AioRpcError as err:
            log.warning(
                "could not revoke a console session's token",
                extra={"tenant_id": session.tenant_id, "reason": err.code().name},
            )
        session.api_key = ""

    async def close(self) -> None:
        """Revoke every open session's token (the console is stopping)."""
        for session in list(self._by_id.values()):
            await self._revoke(session)
        self._by_id.clear()
