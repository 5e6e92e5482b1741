"""SecurityEventsService, once for every service: the binding, its servicer and its background flush."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence

from google.protobuf import timestamp_pb2

from bulkhead.common.v1 import security_events_pb2 as pb
from bulkhead.common.v1 import security_events_pb2_grpc
from shared import paging
from shared.db import Database
from shared.errors import InvalidArgument
from shared.paging import page_size
from shared.periodic import Periodic
from shared.security import Pending, SecurityEvents
from shared.security_events._store import Refusal, SecurityLedger
from shared.server import Binding
from shared.tenancy import require_tenant

log = logging.getLogger("bulkhead.security")

SERVED_BY = ("identity", "credentials", "state", "inference", "orchestrator", "metering")
"""Every service serves SecurityEventsService (the isolation matrix attacks it on each)."""
SCOPE = "security.events.read"
"""The scope ListSecurityEvents declares (a tenant's admin key, `*`, holds it)."""
FLUSH_SECONDS = 5.0
"""Default flush interval (BULKHEAD_SECURITY_EVENTS_FLUSH_SECONDS)."""
SWEEP_SECONDS = 3600.0
"""How often rows past retention are deleted."""
DEFAULT_WINDOW_S = 86400
MAX_REASONS = 20
_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_MAX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z, the largest valid Timestamp


class SecurityEventsServicer(security_events_pb2_grpc.SecurityEventsServiceServicer):
    """ListSecurityEvents over the service's ledger: the caller's own tenant, never another."""

    def __init__(self, ledger: SecurityLedger, *, clock=time.time) -> None:
        self._ledger = ledger
        self._clock = clock

    async def ListSecurityEvents(self, request: pb.ListSecurityEventsRequest, context) -> pb.ListSecurityEventsResponse:
        tenant_id = require_tenant().tenant_id
        start, end = self._window(request)
        reasons = _reasons(request.reasons)
        size = page_size(request.page_size)
        given = _filter_key(request, reasons)
        after = _cursor(request.page_token, given)
        rows = await self._ledger.read(tenant_id, start=start, end=end, reasons=reasons, after=after, limit=size + 1)
        page = paging.keyset(rows, size, lambda r: [r.bucket_start, r.method, r.reason, r.principal_id], filters=given)
        return pb.ListSecurityEventsResponse(
            events=[
                pb.SecurityEvent(
                    service=r.service,
                    method=r.method,
                    reason=r.reason,
                    principal_id=r.principal_id,
                    bucket_start_time=_ts(r.bucket_start * 1_000_000),
                    count=r.count,
                    last_seen_time=_ts(r.last_seen_us),
                )
                for r in page.items
            ],
            next_page_token=page.next_page_token,
        )

    def _window(self, request: pb.ListSecurityEventsRequest) -> tuple[int, int]:
        violations = {}
        for name in ("start_time", "end_time"):
            ts = getattr(request, name)
            if request.HasField(name) and not (0 <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos < 1_000_000_000):
                violations[name] = "a time between 1970 and 9999"
        if violations:
            raise InvalidArgument("time out of range", reason="INVALID_TIME_RANGE", violations=violations)
        end = request.end_time.seconds if request.HasField("end_time") else int(self._clock()) + 60
        start = request.start_time.seconds if request.HasField("start_time") else end - DEFAULT_WINDOW_S
        if start >= end:
            raise InvalidArgument(
                "start_time must be before end_time",
                reason="INVALID_TIME_RANGE",
                violations={"start_time": "before end_time"},
            )
        return start, end


def _reasons(values: Sequence[str]) -> list[str]:
    if len(values) > MAX_REASONS:
        raise InvalidArgument(
            f"at most {MAX_REASONS} reasons", reason="INVALID_REASON", violations={"reasons": f"at most {MAX_REASONS}"}
        )
    bad = [i for i, v in enumerate(values) if not _REASON.match(v)]
    if bad:
        raise InvalidArgument(
            "reasons are upper-case ErrorInfo reasons such as MISSING_SCOPE",
            reason="INVALID_REASON",
            violations={f"reasons[{bad[0]}]": "upper-case letters, digits and _, like MISSING_SCOPE"},
        )
    return sorted(set(values))


def _filter_key(request: pb.ListSecurityEventsRequest, reasons: Sequence[str]) -> str:
    """The filter as the caller gave it (an unset end is "now" on every page: the cursor bounds the rows)."""
    times = [str(getattr(request, n).seconds) if request.HasField(n) else "" for n in ("start_time", "end_time")]
    return ":".join([*times, ",".join(reasons)])


def _cursor(token: str, given: str) -> tuple | None:
    position = paging.decode(token, filters=given)
    if position is None:
        return None
    try:
        b, m, r, p = position
        return int(b), str(m), str(r), str(p)
    except (TypeError, ValueError):
        raise paging.invalid_token() from None


def _ts(micros: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)


class SecurityEventsFlush:
    """The binding's background work: migrate the table, feed it the server's refusals, sweep it."""

    def __init__(self, ledger: SecurityLedger, *, interval: float, sweep_interval: float = SWEEP_SECONDS) -> None:
        self.ledger = ledger
        self.interval = interval
        self.events: SecurityEvents | None = None
        self._flusher: Periodic | None = None
        self._sweeper = Periodic(
            f"{ledger.service}-security-events-sweep", ledger.sweep, interval=sweep_interval, log=log, run_first=True
        )

    async def _write(self, items: Sequence[Pending]) -> None:
        await self.ledger.write(
            [
                Refusal(
                    p.key.tenant_id,
                    p.key.bucket_start,
                    p.key.method,
                    p.key.reason,
                    p.key.principal_id,
                    p.count,
                    p.last_seen_us,
                )
                for p in items
            ]
        )

    async def flush(self) -> int:
        """Write what the server refused since the last flush (tests call it rather than wait)."""
        return await self.events.flush() if self.events is not None else 0

    async def start(self, events: SecurityEvents) -> None:
        await self.ledger.migrate()
        self.events = events
        events.attach(self._write)
        self._flusher = Periodic(
            f"{self.ledger.service}-security-events-flush", self.flush, interval=self.interval, log=log
        )
        self._flusher.start()
        self._sweeper.start()

    async def stop(self) -> None:
        if self._flusher is not None:
            await self._flusher.stop()
            self._flusher = None
        await self._sweeper.stop()
        try:
            await self.flush()
        except Exception:  # the database may be gone already: the counts stay in metrics and logs
            log.warning("%s: last security-events flush failed", self.ledger.service, exc_info=True)


def security_events_binding(
    service: str, db: Database, *, env: Mapping[str, str] = os.environ, interval: float | None = None
) -> Binding:
    """The SecurityEventsService binding a service adds to its server (one line in server.py).

    Its background work writes the server's refusals to `db`'s main database every `interval`
    seconds (BULKHEAD_SECURITY_EVENTS_FLUSH_SECONDS, default 5).
    """
    ledger = SecurityLedger(service, db)
    every = (
        interval if interval is not None else float(env.get("BULKHEAD_SECURITY_EVENTS_FLUSH_SECONDS") or FLUSH_SECONDS)
    )
    return Binding(
        security_events_pb2_grpc.add_SecurityEventsServiceServicer_to_server,
        SecurityEventsServicer(ledger),
        pb.DESCRIPTOR.services_by_name["SecurityEventsService"],
        background=SecurityEventsFlush(ledger, interval=every),
    )
