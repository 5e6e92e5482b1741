"""The inference proxy: every model call of every tenant, held to policy, quotas and budget, and metered.

Modules: wire (proto <-> Messages API JSON), policy (allowlists, pinned versions, ceilings),
limits (requests/min, tokens/min, in-flight), budget (leases from metering), usage (batched
metering with a durable outbox), providers (the anthropic SDK, and the deterministic offline
provider), proxy (the pipeline of one call), peers (metering and credentials over gRPC),
store (tables), servicer and server (gRPC wiring).
"""
