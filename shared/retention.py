"""Retention per tenant: how long audit events and per-event usage detail are kept, and the sweeper
that deletes what is older in every service holding such records.

The policy is the control plane's: identity stores it (SetRetentionPolicy, operators only), a
tenant reads its own (GetRetentionPolicy), and services' sweepers read every tenant's with their
platform key (ListRetentionPolicies, with the tier that says where the tenant's rows are). A
service wires one sweeper with the prune steps it has::

    sweeper = retention_sweeper("orchestrator", svc, [audit.prune], log=log)
    sweeper.start()

Each step takes (policy, now_us) and deletes, in bounded batches, what is older than the policy
allows; steps are idempotent and safe in every replica at once (a pass that finds nothing to do
does nothing; concurrent passes serialize on the chain head). The audit chains keep an anchor (the
last pruned event's sequence and hash) so they still verify from the oldest kept event.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from shared.errors import InvalidArgument
from shared.identity_peer import IdentityPeer
from shared.periodic import Periodic

log = logging.getLogger("bulkhead.retention")

DEFAULT_AUDIT_DAYS = 2557
"""Audit events are kept about 7 years unless the operator says otherwise."""
DEFAULT_USAGE_DETAIL_DAYS = 400
"""Per-event usage detail is kept 400 days (a year of disputes and a bit); hourly roll-ups forever."""
MIN_DAYS = 1
MAX_DAYS = 3653
"""Bounds of either field: a day to 10 years."""
DAY_US = 86_400 * 1_000_000
SWEEP_INTERVAL = 3600.0
"""Seconds between passes (BULKHEAD_RETENTION_SWEEP_SECONDS overrides)."""
BATCH = 1000
"""Rows deleted per transaction: short transactions, so appends and reads never wait long."""


@dataclass(frozen=True, slots=True)
class Policy:
    """One tenant's retention as a sweeper uses it."""

    tenant_id: str
    tier: str
    """Where the tenant's rows live (pooled, bridge, silo)."""
    audit_days: int = DEFAULT_AUDIT_DAYS
    usage_detail_days: int = DEFAULT_USAGE_DETAIL_DAYS

    def audit_cutoff_us(self, now_us: int) -> int:
        """Audit events written before this (epoch microseconds) are pruned."""
        return now_us - self.audit_days * DAY_US

    def usage_cutoff_us(self, now_us: int) -> int:
        """Usage detail before this (epoch microseconds) is pruned."""
        return now_us - self.usage_detail_days * DAY_US


async def prune_chain_prefix(
    route: Any, tenant_id: str, *, events: str, heads: str, cutoff_us: int, batch: int = BATCH
) -> tuple[int, int]:
    """One batch of a hash chain's retention: delete the oldest events (by sequence, from the anchor
    on) written before cutoff_us, at most `batch`, and move the chain's anchor (anchor_seq,
    anchor_hash, anchor_time_us on the heads row) to the last one deleted; returns (deleted, anchor).

    Only a contiguous prefix goes: pruning stops at the first event young enough to keep and at any
    gap (a missing event stays for verify to report). The heads row is locked (Postgres FOR UPDATE,
    SQLite's write lock), so concurrent sweepers serialize and a repeat finds nothing; the anchor
    only moves forward. Tables: `events` (tenant_id, seq, time_us, hash), `heads` (tenant_id, ...)."""
    from shared.db.raw import raw_transaction

    async with raw_transaction(route.bind, tenant_id=tenant_id, schema=route.schema, write=True) as tx:
        lock = " FOR UPDATE" if tx.dialect == "postgresql" else ""
        head = await tx.fetchrow(f"SELECT anchor_seq FROM {heads} WHERE tenant_id = $1{lock}", tenant_id)
        if head is None:
            return 0, 0
        old = anchor = int(head[0])
        rows = await tx.fetch(
            f"SELECT seq, time_us, hash FROM {events} WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            tenant_id,
            anchor,
            batch,
        )
        last = None
        for seq, time_us, digest in rows:
            if int(seq) != anchor + 1 or int(time_us) >= cutoff_us:
                break
            anchor, last = int(seq), (str(digest), int(time_us))
        if last is None:
            return 0, old
        await tx.execute(
            f"DELETE FROM {events} WHERE tenant_id = $1 AND seq > $2 AND seq <= $3", tenant_id, old, anchor
        )
        await tx.execute(
            f"UPDATE {heads} SET anchor_seq = $2, anchor_hash = $3, anchor_time_us = $4 "
            "WHERE tenant_id = $1 AND anchor_seq < $2",
            tenant_id,
            anchor,
            last[0],
            last[1],
        )
    return anchor - old, anchor


def checked_days(field: str, value: int) -> int | None:
    """A requested number of days: None for 0 (the default), else within MIN_DAYS..MAX_DAYS."""
    if value == 0:
        return None
    if not MIN_DAYS <= value <= MAX_DAYS:
        raise InvalidArgument(
            f"{field} must be {MIN_DAYS}..{MAX_DAYS} days, or 0 for the default",
            reason="RETENTION_OUT_OF_RANGE",
            violations={field: f"whole days from {MIN_DAYS} to {MAX_DAYS} (10 years); 0: the default"},
        )
    return int(value)


def effective(audit_days: int | None, usage_detail_days: int | None) -> tuple[int, int]:
    """Stored values (None: default) as the days in force."""
    return (audit_days or DEFAULT_AUDIT_DAYS, usage_detail_days or DEFAULT_USAGE_DETAIL_DAYS)


Source = Callable[[], AsyncIterator[Policy]]
"""Every tenant's policy, as a sweeper pass reads it."""
Prune = Callable[[Policy, int], Awaitable[int]]
"""One sweeper step: (policy, now_us) -> rows pruned."""


class IdentityRetention(IdentityPeer):
    """Every tenant's policy from identity's ListRetentionPolicies, asked with the service's platform key
    (fresh each pass: an operator's change applies at the next pass, no cache to invalidate)."""

    def __init__(
        self, channel: grpc.aio.Channel, credentials: Any, *, timeout: float = 10.0, owns_channel: bool = False
    ) -> None:
        super().__init__(channel, credentials, timeout=timeout, owns_channel=owns_channel)

    async def policies(self) -> AsyncIterator[Policy]:
        from bulkhead.identity.v1 import identity_pb2
        from shared.tiers import tier_from_proto

        token = ""
        while True:
            reply = await self._stub.ListRetentionPolicies(
                identity_pb2.ListRetentionPoliciesRequest(page_size=500, page_token=token),
                timeout=self._timeout,
                metadata=await self._credentials.metadata(),
            )
            for t in reply.tenants:
                yield Policy(
                    t.tenant_id, tier_from_proto(t.tier).value, t.retention.audit_days, t.retention.usage_detail_days
                )
            token = reply.next_page_token
            if not token:
                return


class RetentionSweeper:
    """One pass: every tenant's policy, each prune step for it. A failing tenant is logged and skipped.
    start()/stop() run passes every `interval` seconds in the background (shared.periodic)."""

    def __init__(
        self,
        service: str,
        source: Source,
        steps: Sequence[Prune],
        *,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.service = service
        self._source = source
        self._steps = list(steps)
        self._close = close
        self._periodic: Periodic | None = None

    async def run_once(self, now_us: int | None = None) -> int:
        """Prune everything due now; returns the rows pruned (0 on a repeat)."""
        import time

        now_us = time.time_ns() // 1000 if now_us is None else now_us
        total = 0
        async for policy in self._source():
            for step in self._steps:
                try:
                    total += await step(policy, now_us)
                except Exception:  # one tenant's trouble must not stop the others'
                    log.exception(
                        "%s: retention for tenant %s failed; the next pass retries", self.service, policy.tenant_id
                    )
        if total:
            log.info("%s: retention pruned %d rows", self.service, total)
        return total

    def start(self, *, interval: float = SWEEP_INTERVAL, log: logging.Logger = log) -> None:
        """Run a pass every `interval` seconds (the first after one interval) until stop()."""
        self._periodic = Periodic(f"{self.service}-retention", self.run_once, interval=interval, log=log)
        self._periodic.start()

    async def stop(self) -> None:
        """Stop the background passes and release the policy source."""
        if self._periodic is not None:
            await self._periodic.stop()
            self._periodic = None
        if self._close is not None:
            await self._close()
            self._close = None


def sweep_interval(env: Any) -> float:
    """Seconds between passes: BULKHEAD_RETENTION_SWEEP_SECONDS, else SWEEP_INTERVAL."""
    from shared.config import EnvReader

    return EnvReader(env).positive("BULKHEAD_RETENTION_SWEEP_SECONDS", float(SWEEP_INTERVAL))


def retention_sweeper(
    service: str, config: Any, steps: Sequence[Prune], *, identity: str | None = None
) -> RetentionSweeper:
    """A data-plane service's sweeper, reading policies from identity (at `identity`, else the configured
    peer) with the service's platform key (config: its shared.config.ServiceConfig); stop() also closes
    its channel."""
    from shared.client import make_channel
    from shared.keys import ServiceKeyCredentials

    channel = make_channel(identity or config.peer("identity"), tls=config.tls)
    source = IdentityRetention(channel, ServiceKeyCredentials(channel, config.service_key_file), owns_channel=True)
    return RetentionSweeper(service, source.policies, steps, close=source.close)
