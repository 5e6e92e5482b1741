"""What deleting a tenant leaves in metering, and why (docs/CONTRACT.md, "What deletion keeps").

The usage ledger is the basis of invoices and of tax and audit duties after a contract ends, so
it stays: ids, model names, token counts and times, never prompts, outputs or secrets. Quotas,
budgets, counters and holds only steer live traffic and go.
"""

from __future__ import annotations

KEPT = {
    "metering_usage_events": "usage ledger for billing and statutory retention (ids, model, token counts, "
    "times; no content, no secrets)",
    "metering_usage_hours": "hourly sums of the kept ledger (token counts per model, agent, principal, "
    "outcome), which usage queries read for whole hours: dropping them would "
    "under-count the ledger that stays",
    "metering_tenants": "the tenant's tier, so the kept ledger still prices and exports correctly",
    "metering_usage_retention": "where the kept ledger's per-event detail ends (retention pruned the rest), so "
    "reports read those hours from the roll-up",
}
"""Tables a purge leaves in place, each with its reason (metering_operator_audit, which names the
tenant as target_tenant, has no tenant_id column and is kept as the operators' own audit)."""
