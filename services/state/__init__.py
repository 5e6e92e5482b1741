"""The state service: tenant-scoped, encrypted, versioned agent state.

Threads are append-only event logs with optimistic concurrency (threads.ThreadLog), shared
context is a key-value space per team or run with compare-and-set and TTL (context_kv), and
both are sealed at rest with the tenant's own data key (envelope, datakeys). Run it with
`python -m services.state`.
"""
