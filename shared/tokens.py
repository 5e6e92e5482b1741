"""Short-lived EdDSA (Ed25519) tokens: issuing (identity) and verifying (every service's interceptor)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import BulkheadError, PermissionDenied, Reason, Unauthenticated, Unavailable
from shared.ids import is_tenant_id

_log = logging.getLogger("bulkhead.tokens")

ISSUER = "bulkhead-identity"
ALGORITHM = "EdDSA"
_LEEWAY_SECONDS = 5  # clock skew between replicas


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key (what ListSigningKeys publishes)."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class SigningKey:
    """One Ed25519 key pair that signs tokens, named by its kid."""

    kid: str
    """Key id, carried in every token header so verifiers can pick the key."""
    private_key: Ed25519PrivateKey
    """Signs tokens; never leaves identity."""

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key pair with a kid derived from its public half."""
        key = Ed25519PrivateKey.generate()
        digest = hashlib.sha256(public_key_bytes(key.public_key())).digest()
        return cls(kid="k" + _b64url(digest[:9]), private_key=key)

    @classmethod
    def from_private_bytes(cls, kid: str, raw: bytes) -> SigningKey:
        """Rebuild a stored key."""
        return cls(kid=kid, private_key=Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """The raw private key, for identity's own storage."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says."""

    tenant_id: str
    """The tenant the token is confined to (`tid`)."""
    principal_id: str
    """Whom it was issued to (`sub`)."""
    scopes: frozenset[str]
    """What it allows."""
    tier: str
    """The tenant's isolation tier at issue time."""
    jti: str
    """Unique token id; revocation names it."""
    issued_at: int
    """Seconds since the epoch."""
    expires_at: int
    """Seconds since the epoch; the token is refused after this."""
    kid: str = ""
    """The signing key's id."""
    actor_id: str | None = None
    """The delegator of an exchanged token (`act.sub`)."""
    agent_id: str | None = None
    """The agent an exchanged token was made for."""
    run_id: str | None = None
    """The run an exchanged token was made for."""


class TokenIssuer:
    """Signs tokens with the current signing key (identity only)."""

    def __init__(self, key: SigningKey):
        self.key = key

    def issue(
        self,
        *,
        tenant_id: str,
        principal_id: str,
        scopes: frozenset[str] | set[str] | tuple[str, ...],
        tier: str = "pooled",
        ttl: int = 900,
        actor_id: str | None = None,
        agent_id: str | None = None,
        run_id: str | None = None,
        now: float | None = None,
    ) -> tuple[str, Claims]:
        """A signed token and the claims it carries."""
        iat = int(now if now is not None else time.time())
        claims = Claims(
            tenant_id=tenant_id,
            principal_id=principal_id,
            scopes=frozenset(scopes),
            tier=tier,
            jti="j" + secrets.token_hex(12),
            issued_at=iat,
            expires_at=iat + ttl,
            kid=self.key.kid,
            actor_id=actor_id,
            agent_id=agent_id,
            run_id=run_id,
        )
        payload: dict = {
            "iss": ISSUER,
            "sub": principal_id,
            "tid": tenant_id,
            "tier": tier,
            "scope": " ".join(sorted(claims.scopes)),
            "iat": iat,
            "exp": claims.expires_at,
            "jti": claims.jti,
        }
        if actor_id:
            payload["act"] = {"sub": actor_id}
        if agent_id:
            payload["agent"] = agent_id
        if run_id:
            payload["run"] = run_id
        token = jwt.encode(payload, self.key.private_key, algorithm=ALGORITHM, headers={"kid": self.key.kid})
        return token, claims


class KeySource(Protocol):
    """Where a verifier finds public keys by kid and learns of revoked tokens."""

    async def get(self, kid: str) -> Ed25519PublicKey | None:
        """The public key named kid, or None when it is unknown (after one refetch)."""

    def is_revoked(self, jti: str) -> bool:
        """Whether the token id was revoked (answered from memory: it is on the hot path)."""

    def is_suspended(self, tenant_id: str) -> bool:
        """Whether the tenant is suspended (or being deleted): its tokens are refused, however fresh."""


class StaticKeySource:
    """A fixed set of keys and revocations held in memory (identity itself, tests)."""

    def __init__(self, keys: dict[str, Ed25519PublicKey] | None = None):
        self.keys = dict(keys or {})
        self.revoked: set[str] = set()
        self.suspended: set[str] = set()

    async def get(self, kid: str) -> Ed25519PublicKey | None:
        return self.keys.get(kid)

    def is_revoked(self, jti: str) -> bool:
        return jti in self.revoked

    def is_suspended(self, tenant_id: str) -> bool:
        return tenant_id in self.suspended


class MigrationFeed:
    """The tier-migration part of identity's feed, as this process last heard it (ListRevokedTokens).

    `paused`: tenants a migration pauses now; `placements`: {tenant: (tier, generation)} of every tenant a
    migration ever planned for. Replaced whole on every poll; `version` changes only when either did, so a
    router applies a change once (shared/db/router.py), never per request.
    """

    def __init__(self) -> None:
        self.version = 0
        self.paused: frozenset[str] = frozenset()
        self.placements: Mapping[str, tuple[str, int]] = {}
        self.regions: Mapping[str, str] = {}
        """{tenant: region} of the same tenants (a migration may move one to another region)."""
        self.refreshed_at = float("-inf")
        """time.monotonic() of the last answer identity gave."""
        self._loaded = asyncio.Event()

    @property
    def loaded(self) -> bool:
        """Whether identity answered at least once since this process started."""
        return self._loaded.is_set()

    def publish(
        self,
        paused: frozenset[str],
        placements: Mapping[str, tuple[str, int]],
        regions: Mapping[str, str] | None = None,
    ) -> None:
        """Take one answer of identity's (the poller calls this)."""
        regions = dict(regions or {})
        if paused != self.paused or placements != self.placements or regions != self.regions:
            self.paused, self.placements, self.regions = frozenset(paused), dict(placements), regions
            self.version += 1
        self.refreshed_at = time.monotonic()
        self._loaded.set()

    def age(self) -> float:
        """Seconds since identity last answered (inf before it ever did)."""
        return time.monotonic() - self.refreshed_at

    async def wait_loaded(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for identity's first answer; whether it came."""
        if self.loaded:
            return True
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout)
        except TimeoutError:
            return False
        return True


class TokenVerifier:
    """Verifies bearer tokens; caches verified ones until expiry (revocation is still checked every call)."""

    def __init__(self, keys: KeySource, *, cache_size: int = 10_000, clock=time.time):
        self._keys = keys
        self._cache: OrderedDict[str, Claims] = OrderedDict()
        self._cache_size = cache_size
        self._clock = clock

    async def verify(self, token: str) -> Claims:
        """The claims of a valid token; raises Unauthenticated saying what is wrong otherwise."""
        now = self._clock()
        claims = self._cache.get(token)
        if claims is None:
            claims = await self._verify_signature(token, now)
            self._remember(token, claims)
        if claims.expires_at + _LEEWAY_SECONDS < now:
            self._cache.pop(token, None)
            raise _signed_by(
                Unauthenticated("token expired: request a new one with IssueToken", reason="TOKEN_EXPIRED"), claims
            )
        if self._keys.is_revoked(claims.jti):
            raise _signed_by(
                Unauthenticated("token revoked: request a new one with IssueToken", reason="TOKEN_REVOKED"), claims
            )
        if self._keys.is_suspended(claims.tenant_id):
            raise _signed_by(
                PermissionDenied(
                    "tenant suspended: an operator must resume it (bulkhead tenants resume)", reason="TENANT_SUSPENDED"
                ),
                claims,
            )
        return claims

    def tenant_suspended(self, tenant_id: str) -> bool:
        """Whether the tenant's tokens are refused now (answered from memory, as on every call)."""
        return self._keys.is_suspended(tenant_id)

    @property
    def migration_feed(self) -> MigrationFeed | None:
        """Identity's published migration pauses and placements, when the key source polls them (every
        service but identity); None otherwise. Starts the poll if it is not running yet."""
        feed = getattr(self._keys, "migration_feed", None)
        return feed() if callable(feed) else None

    async def close(self) -> None:
        """Stop whatever background work the key source runs (its revocation poll)."""
        close = getattr(self._keys, "close", None)
        if close is not None:
            await close()

    def _remember(self, token: str, claims: Claims) -> None:
        self._cache[token] = claims
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _verify_signature(self, token: str, now: float) -> Claims:
        try:
            header = _header(token)
        except ValueError:
            raise Unauthenticated("malformed bearer token", reason="TOKEN_MALFORMED") from None
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated("token algorithm not accepted", reason="TOKEN_MALFORMED")
        kid = header.get("kid") or ""
        if not isinstance(kid, str):
            raise Unauthenticated("malformed bearer token", reason="TOKEN_MALFORMED")
        key = await self._keys.get(kid)
        if key is None:
            raise Unauthenticated("token signed by an unknown key", reason="TOKEN_UNKNOWN_KEY")
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                leeway=_LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "sub", "jti", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            # PyJWT checks the signature before the claims: this token is genuine, only late.
            expired = Unauthenticated("token expired: request a new one with IssueToken", reason="TOKEN_EXPIRED")
            try:
                late = _claims(jwt.decode(token, options={"verify_signature": False}), kid)
            except (jwt.PyJWTError, Unauthenticated, KeyError, TypeError, ValueError):
                late = None
            raise _signed_by(expired, late) from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("token signature or claims invalid", reason="TOKEN_INVALID") from None
        except jwt.DecodeError:  # not a well-formed JWS: segments, padding, JSON
            raise Unauthenticated("malformed bearer token", reason="TOKEN_MALFORMED") from None
        except jwt.PyJWTError:
            raise Unauthenticated("token signature or claims invalid", reason="TOKEN_INVALID") from None
        return _claims(payload, kid)


def _header(token: str) -> dict:
    """The token's JOSE header, read only to choose the key: jwt.decode then checks the whole token, this
    header included. (PyJWT's get_unverified_header checks every character of every segment in Python
    first: a sixth of the CPU of verifying a token.) ValueError when it is not a JSON object."""
    segment, dot, _ = token.partition(".")
    if not dot:
        raise ValueError("not a JWS")
    header = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def _claims(payload: dict, kid: str) -> Claims:
    """The Claims of a decoded payload (Unauthenticated when it names no tenant, or not a well-formed one:
    the interceptor then binds only tenant ids that pass shared.ids' one rule)."""
    tid = payload.get("tid")
    if not isinstance(tid, str) or not is_tenant_id(tid):
        raise Unauthenticated("token names no tenant, or a malformed one", reason=Reason.TOKEN_INVALID)
    act = payload.get("act") or {}
    return Claims(
        tenant_id=tid,
        principal_id=payload["sub"],
        scopes=frozenset(payload.get("scope", "").split()),
        tier=payload.get("tier", "pooled"),
        jti=payload["jti"],
        issued_at=int(payload["iat"]),
        expires_at=int(payload["exp"]),
        kid=kid,
        actor_id=act.get("sub"),
        agent_id=payload.get("agent"),
        run_id=payload.get("run"),
    )


def _signed_by(error: BulkheadError, claims: Claims | None) -> BulkheadError:
    """error, remembering the claims of the genuine (signature-checked) token it refuses.

    The interceptor files the refusal under that token's tenant (shared.security); never sent to
    the caller, never logged.
    """
    error.verified_claims = claims  # type: ignore[attr-defined]
    return error


class RefreshingKeySource:
    """Keys and revocations fetched through a loader (identity's public RPCs), cached by kid.

    An unknown kid triggers one refetch, at most once per `min_refetch` seconds, so a flood of
    forged kids cannot turn into a flood of calls to identity. A kid seen before the next refetch is
    allowed waits for it when that is at most `max_wait` seconds away (a key rotated in right after
    a refetch is still found, not refused), and every request waiting meanwhile is answered by that
    one refetch. Revocations and suspended tenants are polled in the background every
    `revocation_poll` seconds, which bounds how long a revoked token, or a suspended tenant's token,
    still works (1 s: suspension holds everywhere within 2 s).
    """

    def __init__(
        self, loader: KeyLoader, *, revocation_poll: float = 1.0, min_refetch: float = 1.0, max_wait: float = 1.0
    ):
        self._loader = loader
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._revoked: dict[str, int] = {}
        self._suspended: frozenset[str] = frozenset()
        self._revision = 0
        self._poll = revocation_poll
        self._min_refetch = min_refetch
        self._max_wait = max_wait
        self._last_fetch = float("-inf")
        """time.monotonic() when the last successful fetch of the keys began."""
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self._closed = False
        self._feed = MigrationFeed() if hasattr(loader, "load_migrations") else None

    def migration_feed(self) -> MigrationFeed | None:
        """The migration feed polled with the revocations (None when the loader has none); starts the poll."""
        if self._feed is not None:
            self._ensure_poller()
        return self._feed

    async def get(self, kid: str) -> Ed25519PublicKey | None:
        self._ensure_poller()
        key = self._keys.get(kid)
        if key is not None:
            return key
        asked = time.monotonic()
        # Everyone missing a key waits for the one fetch in flight, then looks again.
        async with self._lock:
            key = self._keys.get(kid)
            if key is not None or self._last_fetch >= asked:  # a fetch that began after we asked: final
                return key
            due = self._last_fetch + self._min_refetch - time.monotonic()
            if due > self._max_wait:  # fetched lately, and the next is not due soon: refuse, ask nobody
                return None
            if due > 0:
                await asyncio.sleep(due)
            started = time.monotonic()
            try:
                self._keys = dict(await self._loader.load_keys())
            except Exception:  # noqa: BLE001 - however the load failed, the caller gets UNAVAILABLE
                raise Unavailable(
                    "cannot fetch signing keys from identity; retry shortly",
                    reason="KEYS_UNAVAILABLE",
                    retry_after=1.0,
                ) from None
            self._last_fetch = started
            return self._keys.get(kid)

    def is_revoked(self, jti: str) -> bool:
        return jti in self._revoked

    def is_suspended(self, tenant_id: str) -> bool:
        return tenant_id in self._suspended

    async def refresh_revocations(self) -> None:
        """Pull revocations made since the last poll and the suspended tenants; drop expired revocations."""
        revision, entries = await self._loader.load_revocations(self._revision)
        self._suspended = frozenset(await self._loader.load_suspended())
        if self._feed is not None:  # from the same answer of identity's as the suspensions
            self._feed.publish(*await self._loader.load_migrations())  # type: ignore[attr-defined]
        now = time.time()
        self._revoked.update(entries)
        self._revoked = {j: exp for j, exp in self._revoked.items() if exp + _LEEWAY_SECONDS >= now}
        self._revision = revision

    def _ensure_poller(self) -> None:
        if self._closed:
            return
        if self._poller is None or self._poller.done():
            with contextlib.suppress(RuntimeError):
                self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        failing = ""
        me = asyncio.current_task()
        # A cancel that lands while grpc.aio finishes a call can be absorbed by grpc's own task (the
        # call then fails as an ordinary error): the request still counts in cancelling(), so stop on
        # it, or loop shutdown would wait for this task forever.
        while not self._closed and not (me is not None and me.cancelling()):
            try:
                await self.refresh_revocations()
                if failing:
                    _log.info("revocations and suspensions reach this service again")
                failing = ""
            except Exception as exc:  # noqa: BLE001 - identity briefly down: keep the last lists, try again
                # Said once per kind of failure, not every second: a missing service key would flood the log.
                if type(exc).__name__ != failing:
                    _log.warning(
                        "cannot poll identity for revocations and suspensions (%s); keeping the last "
                        "lists and retrying every %.1f s",
                        _describe(exc),
                        self._poll,
                    )
                failing = type(exc).__name__
            await asyncio.sleep(self._poll)

    async def close(self) -> None:
        """Stop the background poll (and never start it again)."""
        self._closed = True
        if self._poller and not self._poller.done():
            self._poller.cancel()
            await asyncio.wait({self._poller}, timeout=5)


def _describe(exc: Exception) -> str:
    details = getattr(exc, "details", None)
    text = details() if callable(details) else str(exc)
    return f"{type(exc).__name__}: {text}"[:300]


class KeyLoader(Protocol):
    """Fetches what a RefreshingKeySource caches."""

    async def load_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every published public key by kid."""

    async def load_revocations(self, since: int) -> tuple[int, dict[str, int]]:
        """(new revision, {jti: expires_at}) revoked after revision `since`."""

    async def load_suspended(self) -> frozenset[str]:
        """Every tenant whose tokens must be refused now (called right after load_revocations)."""

    # Optional: `async def load_migrations(self) -> tuple[frozenset[str], dict[str, tuple[str, int]]]`, the
    # tenants a tier migration pauses and every migrated tenant's (tier, generation), from the same answer
    # (called right after load_suspended). A loader that has it gives its key source a MigrationFeed.
