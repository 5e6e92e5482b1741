"""The attack matrix: every RPC × every attack, sent over the wire, each cell checked.

Attacks on the caller's identity are refused by the interceptor before any handler runs, so they
go to every method with an empty request. The cross-tenant attack needs B's real resources: it
sends A's valid token with a request naming B's resource, and again naming a random lookalike,
and requires the same reply (code, message, details, and for writes the reply itself).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.json_format import MessageToDict

from shared.errors import REASONS, error_details
from shared.tenancy import scope_matches

from .factories import Ids, Target
from .methods import Rpc
from .rig import Rig, md

CROSS_TENANT = "cross_tenant"
_TIMEOUT = 10.0


@dataclass(frozen=True)
class Outcome:
    """What one call answered."""

    code: str
    message: str = ""
    details: dict = field(default_factory=dict)
    replies: tuple = ()
    details_bytes: int = 0
    """Size of the google.rpc.Status trailer (grpc-status-details-bin) as sent."""

    @property
    def status(self) -> str:
        reason = self.details.get("reason")
        return f"{self.code}/{reason}" if reason else self.code


@dataclass(frozen=True)
class Attack:
    """One way to call a method as someone who must not get through."""

    name: str
    expect: str
    """CODE/REASON every method must answer."""
    metadata: Callable[[Rig, Rpc], tuple]
    applies: Callable[[Rpc], bool] = lambda rpc: not rpc.public


def _bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


def _lacking(rig: Rig, rpc: Rpc) -> str:
    """A narrowed token of A's whose one scope does not cover the method."""
    return next(
        t
        for name, t in rig.tokens.items()
        if name.startswith("narrowed:") and not scope_matches(name.partition(":")[2], rpc.scope)
    )


_AMBIGUOUS = "UNAUTHENTICATED/AMBIGUOUS_METADATA"
ATTACKS: tuple[Attack, ...] = (
    Attack("spoofed_tenant", "PERMISSION_DENIED/TENANT_MISMATCH", lambda r, _: md(r.a.token, r.b.tenant_id)),
    Attack(
        "dup_tenant_AB",
        _AMBIGUOUS,
        lambda r, _: (_bearer(r.a.token), ("x-tenant-id", r.a.tenant_id), ("x-tenant-id", r.b.tenant_id)),
    ),
    Attack(
        "dup_tenant_BA",
        _AMBIGUOUS,
        lambda r, _: (_bearer(r.a.token), ("x-tenant-id", r.b.tenant_id), ("x-tenant-id", r.a.tenant_id)),
    ),
    Attack(
        "dup_auth_AB", _AMBIGUOUS, lambda r, _: (_bearer(r.a.token), _bearer(r.b.token), ("x-tenant-id", r.a.tenant_id))
    ),
    Attack(
        "dup_auth_BA", _AMBIGUOUS, lambda r, _: (_bearer(r.b.token), _bearer(r.a.token), ("x-tenant-id", r.a.tenant_id))
    ),
    # A's own valid identity, but two request ids: idempotency keys derive from it, so no pick by position.
    Attack(
        "dup_request_id",
        _AMBIGUOUS,
        lambda r, _: (*md(r.a.token, r.a.tenant_id), ("x-request-id", "r-first"), ("x-request-id", "r-second")),
    ),
    # What a proxy may make of duplicates (joined with a comma) or of sloppy values: never a match.
    Attack(
        "tenant_joined",
        "PERMISSION_DENIED/TENANT_MISMATCH",
        lambda r, _: md(r.a.token, f"{r.a.tenant_id},{r.b.tenant_id}"),
    ),
    Attack("tenant_padded", "PERMISSION_DENIED/TENANT_MISMATCH", lambda r, _: md(r.a.token, f" {r.a.tenant_id} ")),
    Attack(
        "auth_joined",
        "UNAUTHENTICATED/TOKEN_MALFORMED",
        lambda r, _: (("authorization", f"Bearer {r.a.token}, Bearer {r.b.token}"), ("x-tenant-id", r.a.tenant_id)),
    ),
    Attack("no_token", "UNAUTHENTICATED/MISSING_TOKEN", lambda r, _: (("x-tenant-id", r.a.tenant_id),)),
    Attack("expired", "UNAUTHENTICATED/TOKEN_EXPIRED", lambda r, _: md(r.tokens["expired"], r.a.tenant_id)),
    Attack("tampered_tid", "UNAUTHENTICATED/TOKEN_INVALID", lambda r, _: md(r.tokens["tampered"], r.b.tenant_id)),
    Attack("alg_none", "UNAUTHENTICATED/TOKEN_MALFORMED", lambda r, _: md(r.tokens["alg_none"], r.a.tenant_id)),
    Attack("foreign_key", "UNAUTHENTICATED/TOKEN_INVALID", lambda r, _: md(r.tokens["foreign_key"], r.a.tenant_id)),
    Attack("unknown_kid", "UNAUTHENTICATED/TOKEN_UNKNOWN_KEY", lambda r, _: md(r.tokens["unknown_kid"], r.a.tenant_id)),
    Attack("revoked", "UNAUTHENTICATED/TOKEN_REVOKED", lambda r, _: md(r.tokens["revoked"], r.a.tenant_id)),
    Attack("suspended", "PERMISSION_DENIED/TENANT_SUSPENDED", lambda r, _: r.suspended.metadata),
    Attack("narrowed", "PERMISSION_DENIED/MISSING_SCOPE", lambda r, rpc: md(_lacking(r, rpc), r.a.tenant_id)),
    Attack(
        "admin_on_platform",
        "PERMISSION_DENIED/MISSING_SCOPE",
        lambda r, _: r.a.metadata,
        applies=lambda rpc: rpc.platform,
    ),
)
ATTACK_NAMES = (*(a.name for a in ATTACKS), CROSS_TENANT)


@dataclass(frozen=True)
class Cell:
    """One method × attack: what came back and whether that is right."""

    rpc: str
    attack: str
    status: str
    ok: bool
    why: str = ""


@dataclass
class Matrix:
    """All cells of one run."""

    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    def add(self, cell: Cell) -> None:
        self.cells[(cell.rpc, cell.attack)] = cell

    @property
    def failures(self) -> list[Cell]:
        return [c for c in self.cells.values() if not c.ok]

    def counts(self) -> Counter:
        """(attack, status) -> how many methods answered that."""
        return Counter((c.attack, c.status) for c in self.cells.values())

    def report(self) -> str:
        """Why the matrix fails: one line per wrong cell, naming the RPC and the attack."""
        return "\n".join(f"{c.rpc} × {c.attack}: got {c.status}; {c.why}" for c in self.failures)


async def invoke(
    channel: grpc.aio.Channel, rpc: Rpc, request, metadata, *, send: bool = True, timeout: float = _TIMEOUT
) -> Outcome:
    """Call rpc in its own shape; stream requests carry one message, or none when send is False
    (a client write racing the server's early status is reported as INTERNAL: grpc/grpc#36066)."""
    ser, de = (lambda m: m.SerializeToString()), rpc.response_class().FromString
    messages = [request] if send else []

    async def requests():
        for m in messages:
            yield m

    try:
        if rpc.shape == "unary_unary":
            replies = [await channel.unary_unary(rpc.path, ser, de)(request, metadata=metadata, timeout=timeout)]
        elif rpc.shape == "unary_stream":
            replies = [
                r async for r in channel.unary_stream(rpc.path, ser, de)(request, metadata=metadata, timeout=timeout)
            ]
        elif rpc.shape == "stream_unary":
            replies = [await channel.stream_unary(rpc.path, ser, de)(requests(), metadata=metadata, timeout=timeout)]
        else:
            replies = [
                r
                async for r in channel.stream_stream(rpc.path, ser, de)(requests(), metadata=metadata, timeout=timeout)
            ]
    except grpc.aio.AioRpcError as err:
        trailer = next((v for k, v in err.trailing_metadata() or () if k == "grpc-status-details-bin"), b"")
        details = error_details(err)
        # Every reason a service sends comes from the catalog (bulkhead.common.v1.ErrorReason), in every cell
        # of the matrix and every fuzzed call (tests/test_error_reasons.py scans the code for the rest).
        assert details["reason"] is None or details["reason"] in REASONS, (
            f"{rpc.path} answered {err.code().name} with reason {details['reason']!r}, not in the catalog"
        )
        return Outcome(err.code().name, err.details() or "", details, details_bytes=len(trailer))
    return Outcome("OK", replies=tuple(replies))


async def refusal(rig: Rig, rpc: Rpc, attack: Attack) -> Cell:
    """One identity attack on one method: the exact status, or a failing cell that says what came back."""
    out = await invoke(rig.channels[rpc.service], rpc, rpc.request_class()(), attack.metadata(rig, rpc), send=False)
    ok = out.status == attack.expect
    return Cell(rpc.key, attack.name, out.status, ok, "" if ok else f"expected {attack.expect} ({out.message!r})")


# Refusals of the interceptor: a cross-tenant cell that ends in one of these never tested the handler.
_INTERCEPTOR_REASONS = {
    "MISSING_TOKEN",
    "MISSING_TENANT",
    "TOKEN_MALFORMED",
    "TOKEN_EXPIRED",
    "TOKEN_REVOKED",
    "TOKEN_INVALID",
    "TOKEN_UNKNOWN_KEY",
    "TENANT_MISMATCH",
    "MISSING_SCOPE",
    "NO_AUTH_RULE",
    "AMBIGUOUS_METADATA",
    "TENANT_SUSPENDED",
    "KEYS_UNAVAILABLE",
}
_RID = re.compile(r"\b[0-9a-f]{32}\b")
_VOLATILE = {
    "etag",
    "jti",
    "token",
    "ciphertext",
    "plaintext",
    "secret",
    "reservation_id",
    "lease_id",
    "id",
    "run_id",
    "prefix",
    "key_version",
}


def _scrub(value, names: list[str]):
    """value with the requested ids named <ID>, request ids <RID>, and per-call fields left out."""
    if isinstance(value, dict):
        return {k: _scrub(v, names) for k, v in sorted(value.items()) if k not in _VOLATILE and not k.endswith("time")}
    if isinstance(value, list):
        return [_scrub(v, names) for v in value]
    if isinstance(value, str):
        for name in names:
            value = value.replace(name, "<ID>")
        return _RID.sub("<RID>", value)
    return value


def _seen(out: Outcome, ids: Ids, target: Target) -> tuple:
    names = sorted((v for v in ids.__dict__.values() if isinstance(v, str) and v), key=len, reverse=True)
    replies = [MessageToDict(r, preserving_proto_field_name=True) for r in out.replies] if target.compare_reply else []
    return out.code, _scrub(out.message, names), _scrub(out.details, names), _scrub(replies, names)


def _leaks(out: Outcome, request, markers: list[bytes]) -> list[bytes]:
    """B's markers in A's reply that A did not itself send."""
    sent = request.SerializeToString()
    body = b"".join(r.SerializeToString() for r in out.replies) + out.message.encode() + repr(out.details).encode()
    return [m for m in markers if m in body and m not in sent]


async def cross_tenant(rig: Rig, rpc: Rpc, target: Target) -> Cell:
    """A's valid token on B's resource: refused or not found, exactly as for a resource that does not exist."""
    channel, random_ids = rig.channels[rpc.service], rig.b_ids.lookalike()
    theirs_req, random_req = target.build(rig.b_ids), target.build(random_ids)
    theirs = await invoke(channel, rpc, theirs_req, rig.a.metadata)
    unknown = await invoke(channel, rpc, random_req, rig.a.metadata)
    problems = []
    if theirs.details.get("reason") in _INTERCEPTOR_REASONS:
        problems.append(f"A's own valid call never reached the handler ({theirs.message!r}): this proves nothing")
    if theirs.code in ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"):
        problems.append(f"not a well-defined answer ({theirs.message!r})")
    if target.absent and theirs.code not in ("NOT_FOUND", "PERMISSION_DENIED"):
        problems.append(f"B's {target.resource} must be NOT_FOUND or PERMISSION_DENIED for A")
    elif not target.absent and theirs.status != (target.refused or "OK"):
        problems.append(f"expected {target.refused or 'OK'}: a request that fails for another reason proves nothing")
    if _seen(theirs, rig.b_ids, target) != _seen(unknown, random_ids, target):
        problems.append(
            f"A's reply naming B's {target.resource or 'ids'} differs from a random one's: "
            f"B's -> {_seen(theirs, rig.b_ids, target)}; random -> {_seen(unknown, random_ids, target)}"
        )
    leaked = _leaks(theirs, theirs_req, rig.markers)
    if leaked:
        problems.append(f"A's reply carries B's data {leaked}")
    return Cell(rpc.key, CROSS_TENANT, theirs.status, not problems, "; ".join(problems))


async def run_matrix(
    rig: Rig,
    rpcs: list[Rpc],
    factories: dict[str, Target],
    *,
    attacks: tuple[Attack, ...] = ATTACKS,
    with_cross_tenant: bool = True,
    concurrency: int = 24,
) -> Matrix:
    """Every applicable attack on every method, the cross-tenant ones in their phases (see Target.phase)."""
    matrix, gate = Matrix(), asyncio.Semaphore(concurrency)

    async def one(make):
        async with gate:
            matrix.add(await make())

    tenant_rpcs = [r for r in rpcs if not r.public and not r.platform] if with_cross_tenant else []
    phases = [
        [lambda r=r: cross_tenant(rig, r, factories[r.path]) for r in tenant_rpcs if factories[r.path].phase == n]
        for n in range(3)
    ]
    refusals = [lambda r=r, a=a: refusal(rig, r, a) for r in rpcs for a in attacks if a.applies(r)]
    await asyncio.gather(*(one(j) for j in phases[0]))
    await asyncio.gather(*(one(j) for j in refusals + phases[1]))
    await asyncio.gather(*(one(j) for j in phases[2]))
    return matrix
