"""Denials are security events: counted per tenant and reason, and logged without the token."""
from __future__ import annotations

import logging
from collections import Counter

from prometheus_client import Counter as PromCounter

from shared.metrics import tenant_label

log = logging.getLogger("bulkhead.security")

DENIALS = PromCounter("bulkhead_security_denials_total", "Requests refused by the tenancy interceptor",
                      ["service", "tenant", "reason"])


class SecurityEvents:
    """Records every refusal so a principal probing outside its tenant shows up."""

    def __init__(self, service: str):
        self.service = service
        self.counts: Counter[tuple[str, str]] = Counter()
        """(tenant, reason) -> denials since start; tenant is the token's, or "unauthenticated"."""

    def denied(self, *, reason: str, method: str, peer: str, tenant_id: str | None,
               principal_id: str | None, claimed_tenant: str | None, message: str) -> None:
        """Count and log one refusal. Never pass the token here."""
        tenant = tenant_id or "unauthenticated"
        self.counts[(tenant, reason)] += 1
        DENIALS.labels(self.service, tenant_label(tenant), reason).inc()
        log.warning("request denied: %s", message, extra={
            "event": "security.denied", "reason": reason, "method": method, "peer": peer,
            "tenant_id": tenant, "principal_id": principal_id or "", "claimed_tenant": claimed_tenant or ""})
