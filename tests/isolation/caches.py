"""Every in-process cache of services/ and shared/ (found by cache_scan), and how it is kept per tenant.

Each entry says what the cache is keyed by and which test tries to poison it across tenants, or
why it holds nothing of any tenant's. A cache the scan finds that is not listed here fails
test_caches.py, saying what to add.
"""

from __future__ import annotations

from dataclasses import dataclass

TENANT, UNIQUE, PLATFORM = "keyed by tenant", "keyed by a value only one tenant holds", "no tenant data"


@dataclass(frozen=True)
class Entry:
    kind: str
    """TENANT, UNIQUE or PLATFORM."""
    why: str
    """What the key is (or why no tenant's data is in it)."""
    proof: str = ""
    """The test that tries to poison it from another tenant ("file::test")."""


_CACHES = "tests/isolation/test_caches.py::"
_IDS = "tests/isolation/test_client_ids.py::"
_MATRIX = "tests/isolation/test_attack_matrix.py::test_matrix_has_no_wrong_cell"

CACHES: dict[str, Entry] = {
    # credentials
    "services/credentials/secret_manager.py::_views": Entry(
        TENANT, "(tenant, secret name) -> readable versions", _CACHES + "test_secret_read_caches_are_per_tenant"
    ),
    "services/credentials/secret_manager.py::_values": Entry(
        TENANT, "(tenant, name, version, created) -> value", _CACHES + "test_secret_read_caches_are_per_tenant"
    ),
    "services/credentials/local_backend.py::_rings": Entry(
        TENANT, "(tenant, purpose) -> Transit key ring", _CACHES + "test_transit_key_rings_are_per_tenant"
    ),
    "services/credentials/audit.py::_heads": Entry(
        TENANT, "tenant -> head of its access-audit chain", "tests/services/credentials/test_audit.py"
    ),
    "services/credentials/audit.py::_recent": Entry(
        TENANT,
        "tenant -> size of its largest recent audit batch and until when it counts (a count, no event)",
        "tests/services/credentials/test_audit_hold.py::test_a_tenants_batches_never_hold_another_tenant",
    ),
    "services/credentials/audit.py::_paths": Entry(PLATFORM, "SQLite engine -> its file's path (no rows, no values)"),
    "services/credentials/sqlite_inline.py::_commits": Entry(
        PLATFORM, "SQLite file -> commits since its last checkpoint"
    ),
    "services/credentials/vault_read.py::_idle": Entry(
        PLATFORM,
        "OpenBao node -> idle kept-alive HTTP connections; "
        "each request carries its own tenant's token, "
        "nothing of an answer is kept",
    ),
    "services/credentials/vault_tokens.py::_minted": Entry(
        TENANT, "tenant -> its OpenBao token (OpenBao only)", "tests/services/credentials/test_vault_backend.py"
    ),
    "services/credentials/vault_tokens.py::_ready_tenants": Entry(TENANT, "tenants whose OpenBao policy exists"),
    "services/credentials/vault_tokens.py::_ready_namespaces": Entry(TENANT, "silo namespaces already made"),
    "services/credentials/rotation.py::_by_name": Entry(PLATFORM, "rotator plugins by name, from configuration"),
    # inference
    "services/inference/proxy.py::_policy_cache": Entry(
        TENANT, "tenant -> model policy and private models", _CACHES + "test_model_policy_cache_is_per_tenant"
    ),
    "services/inference/proxy.py::_limits_cache": Entry(
        TENANT, "tenant -> its quota limits", _CACHES + "test_limits_cache_is_per_tenant"
    ),
    "services/inference/proxy.py::_replays": Entry(
        TENANT, "(tenant, x-request-id) -> earlier reply", _IDS + "test_a_reply_replayed_across_tenants_fails_the_check"
    ),
    "services/inference/proxy.py::_entries": Entry(
        TENANT, "_ReplayCache storage, same keys", _IDS + "test_a_reply_replayed_across_tenants_fails_the_check"
    ),
    "services/inference/proxy.py::_upstream_ids": Entry(
        TENANT,
        "tenant -> its opaque user id and cache partition (keyed hashes of that tenant id alone)",
        "tests/services/inference/test_upstream_ids.py::test_upstream_ids_are_each_tenants_own",
    ),
    "services/inference/peers.py::_cache": Entry(
        TENANT, "tenant -> its own provider key", _CACHES + "test_provider_key_cache_is_per_tenant"
    ),
    "services/inference/sdk_http.py::_timeouts": Entry(
        PLATFORM, "a pooled SDK client's last timeout -> its request extension (client settings, no request data)"
    ),
    "services/inference/providers.py::_clients": Entry(
        UNIQUE,
        "(provider key, base url) -> SDK client: a tenant's own key is its own client",
        _CACHES + "test_provider_key_cache_is_per_tenant",
    ),
    "services/inference/limits.py::_tenants": Entry(
        TENANT, "tenant -> its rate and concurrency state", _CACHES + "test_limits_cache_is_per_tenant"
    ),
    "services/inference/budget.py::_leases": Entry(
        TENANT, "(tenant, model) -> budget leases held locally", _CACHES + "test_limits_cache_is_per_tenant"
    ),
    "services/inference/budget.py::_contexts": Entry(TENANT, "tenant -> context to renew its leases with"),
    "services/inference/budget.py::_episodes": Entry(
        TENANT, "(tenant, model) -> when its calls began waiting for budget and until when they wait (times, no data)"
    ),
    "services/inference/usage.py::_contexts": Entry(TENANT, "tenant -> context to deliver its usage with"),
    "services/inference/usage.py::_backlogged": Entry(TENANT, "tenants with undelivered usage"),
    "services/inference/attempts.py::_rows": Entry(TENANT, "(tenant, event id) -> attempt row"),
    # metering
    "services/metering/budgets.py::_specs": Entry(
        TENANT, "TenantCache: tenant -> budget specs", _CACHES + "test_budget_spec_cache_is_per_tenant"
    ),
    "services/metering/prices.py::_books": Entry(PLATFORM, "the platform-wide price table, one entry"),
    "services/metering/ledger.py::_noted": Entry(TENANT, "tenants already noted with their tier"),
    "services/metering/meters.py::models": Entry(PLATFORM, "model names seen per metrics registry, to bound labels"),
    "services/metering/pricing.py::_by_model": Entry(PLATFORM, "the platform price table by model"),
    "services/metering/periods.py::_month_bounds()": Entry(PLATFORM, "UTC day -> month bounds"),
    "services/metering/store.py::_sqlite_usage_insert()": Entry(PLATFORM, "row count -> SQL text"),
    "services/metering/store.py::_pg_json_insert()": Entry(PLATFORM, "the roll-up CTE to append -> SQL text"),
    "services/metering/rollup.py::_sqlite_upsert()": Entry(PLATFORM, "row count -> SQL text"),
    # orchestrator
    "services/orchestrator/dispatcher.py::_backlog": Entry(
        UNIQUE,
        "server-made run id -> steps (with the run's tenant for a fresh run executing here: WatchRun streams only "
        "it from the feed alone; any other stream reads the run in the caller's tenant first)",
        "tests/services/orchestrator/test_e2e.py::test_a_run_executing_here_streams_from_its_first_step_to_its_tenant_only",
    ),
    "services/orchestrator/dispatcher.py::_cancel": Entry(UNIQUE, "server-made run ids to cancel", _MATRIX),
    "services/orchestrator/dispatcher.py::_tenant_of": Entry(
        UNIQUE, "server-made run id -> its tenant, for runs executing here (counts slots; answers no caller)", _MATRIX
    ),
    "services/orchestrator/dispatcher.py::_outages": Entry(
        UNIQUE,
        "server-made run id -> executions in a row that met an unavailable dependency (sets a backoff; answers "
        "no caller)",
        "tests/services/orchestrator/test_dispatcher.py::"
        "test_a_run_meeting_an_unavailable_dependency_waits_longer_each_time_before_its_next_claim",
    ),
    "services/orchestrator/dispatcher.py::_expected": Entry(
        UNIQUE,
        "server-made run id -> its tenant, for a fresh run a StartRun here queued: only that tenant's WatchRun "
        "skips the database; any other stream reads the run in the caller's tenant first",
        "tests/services/orchestrator/test_e2e.py::test_a_run_queued_here_streams_from_its_first_step_to_its_tenant_only",
    ),
    "services/orchestrator/ratelimit.py::_buckets": Entry(
        TENANT, "tenant -> HTTP tool rate bucket", "tests/services/orchestrator/test_canary_ratelimit.py"
    ),
    # state
    "services/state/envelope.py::_cache": Entry(
        TENANT, "(tenant, key id) -> unwrapped data key", _CACHES + "test_envelope_key_cache_is_per_tenant"
    ),
    "services/state/envelope.py::_current": Entry(
        TENANT, "tenant -> its current data key id", _CACHES + "test_envelope_key_cache_is_per_tenant"
    ),
    # shared
    "shared/cache.py::_entries": Entry(
        TENANT,
        "TenantCache storage: (tenant_id, key) -> value; every read names the tenant",
        "tests/shared/test_cache.py::test_two_tenants_with_the_same_key_never_see_each_other",
    ),
    "shared/cache.py::_generations": Entry(
        TENANT,
        "TenantCache invalidations, same (tenant_id, key) slots",
        "tests/shared/test_cache.py::test_an_invalidation_is_per_tenant",
    ),
    "shared/tokens.py::_cache": Entry(
        UNIQUE,
        "the whole signed token -> its claims (the tenant is inside)",
        _CACHES + "test_token_cache_is_keyed_by_the_whole_signed_token",
    ),
    "shared/tokens.py::_keys": Entry(PLATFORM, "kid -> identity's public signing key"),
    "shared/tokens.py::_revoked": Entry(UNIQUE, "revoked jti -> expiry (jti unique per token)"),
    "shared/tokens.py::_suspended": Entry(PLATFORM, "suspended tenant ids, published by identity"),
    "shared/tokens.py::keys": Entry(PLATFORM, "StaticKeySource: kid -> public key (tests, identity itself)"),
    "shared/tokens.py::revoked": Entry(UNIQUE, "StaticKeySource: revoked jtis"),
    "shared/tokens.py::suspended": Entry(PLATFORM, "StaticKeySource: suspended tenant ids"),
    "shared/keys.py::_suspended": Entry(PLATFORM, "suspended tenant ids, published by identity"),
    "shared/scopes.py::_rules": Entry(PLATFORM, "method path -> AuthRule from the descriptors"),
    "shared/bounds.py::_plan()": Entry(PLATFORM, "message descriptor -> integer fields to check"),
    "shared/bounds.py::_reaches_wide()": Entry(PLATFORM, "message descriptor -> has wide integers"),
    "shared/bounds.py::_scan_plan()": Entry(PLATFORM, "message descriptor -> how to read its checked fields"),
    "shared/db/raw.py::sqlite_sql()": Entry(PLATFORM, "SQL text -> its SQLite spelling"),
    "shared/db/session.py::_criteria()": Entry(
        TENANT, "tenant id -> the loader criteria naming that tenant", "tests/shared/db/test_session.py"
    ),
    "shared/db/router.py::_routes": Entry(
        TENANT, "(region, tier, tenant) -> engine and schema", "tests/shared/db/test_tiers.py"
    ),
    "shared/db/router.py::_regions": Entry(PLATFORM, "region name -> its database, from configuration"),
    "services/credentials/regional.py::_backends": Entry(
        PLATFORM, "region name -> its OpenBao backend, from configuration"
    ),
    "shared/db/router.py::_tenant_regions": Entry(
        TENANT, "tenant id -> its region, as identity placed it", "tests/shared/db/test_regions.py"
    ),
    "shared/db/router.py::_engine_options": Entry(PLATFORM, "engine options from configuration"),
    "shared/db/router.py::_tenant_tiers": Entry(
        TENANT, "tenant id -> its tier, as identity placed it", "tests/lifecycle/test_migrate_placement.py"
    ),
    "shared/db/router.py::_placed": Entry(
        TENANT, "tenant id -> the tier a live migration switched it to", "tests/lifecycle/test_migrate_postgres.py"
    ),
    "shared/db/router.py::_paused": Entry(
        TENANT, "tenant id -> end of its migration pause", "tests/lifecycle/test_migrate_postgres.py"
    ),
    "shared/db/router.py::_feed_tiers": Entry(
        TENANT,
        "tenant id -> its tier, as identity's migration feed published it",
        "tests/shared/db/test_migration_feed.py",
    ),
    "shared/db/router.py::_placed_regions": Entry(
        TENANT,
        "tenant id -> the region a live migration switched it to",
        "tests/lifecycle/test_shared_database.py::test_a_router_follows_a_region_move_by_switch_feed_and_placement",
    ),
    "shared/db/router.py::_feed_regions": Entry(
        TENANT,
        "tenant id -> its region, as identity's migration feed published it",
        "tests/lifecycle/test_shared_database.py::test_a_router_follows_a_region_move_by_switch_feed_and_placement",
    ),
    "services/orchestrator/engine.py::_prompts": Entry(
        UNIQUE, "agent name -> its prompt and tools, held by one run's execution (one tenant's run only)"
    ),
    "shared/db/router.py::_feed_generations": Entry(
        TENANT, "tenant id -> its placement generation, from the same feed", "tests/shared/db/test_migration_feed.py"
    ),
    "shared/db/router.py::_feed_paused": Entry(
        TENANT, "tenant ids the feed paused when this router last applied it", "tests/shared/db/test_migration_feed.py"
    ),
    "shared/tokens.py::paused": Entry(PLATFORM, "MigrationFeed: tenant ids a migration pauses, published by identity"),
    "shared/keys.py::_migrations": Entry(PLATFORM, "paused tenant ids and placements, published by identity"),
    "shared/db/replica.py::_silos": Entry(
        UNIQUE,
        "silo database name -> replica engine: a silo database is one "
        "tenant's, and RLS still binds every session on it",
        "tests/shared/db/test_read_replica.py",
    ),
    "shared/client.py::_seen": Entry(
        TENANT,
        "tenant -> highest WAL position its calls were answered with, sent only on that tenant's calls",
        "tests/services/state/test_read_replica.py",
    ),
    "shared/lifecycle.py::_keep": Entry(PLATFORM, "table -> why its rows outlive a purge, from the service's wiring"),
    "shared/logs.py::_secrets": Entry(
        PLATFORM,
        "every registered secret value, scrubbed from every log line "
        "(deliberately not per tenant: no tenant's secret may reach any log)",
    ),
    "shared/metrics.py::_seen": Entry(PLATFORM, "tenant ids used as metric labels (bounded), returns only a label"),
    "shared/metrics.py::_request_children": Entry(
        PLATFORM, "(service, method, tenant label, code) -> its request counter (bounded); holds only counts"
    ),
    "shared/auth.py::_methods": Entry(
        PLATFORM, "registered method path -> its rule, span name and attributes, latency histogram child"
    ),
    "shared/service_config.py::service_config_json()": Entry(PLATFORM, "the channels' retry policy JSON"),
}
