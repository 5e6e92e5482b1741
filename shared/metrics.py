"""Prometheus metrics shared by every service, with a bounded tenant label."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Histogram, start_http_server

MAX_TENANT_LABELS = 200
"""Distinct tenant label values per process; further tenants are counted as "other"."""

_seen: set[str] = set()
_lock = threading.Lock()

REQUESTS = Counter("bulkhead_rpc_requests_total", "RPCs handled", ["service", "method", "tenant", "code"])
LATENCY = Histogram(
    "bulkhead_rpc_latency_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def tenant_label(tenant_id: str) -> str:
    """The tenant's label value, or "other" once MAX_TENANT_LABELS tenants have been seen (bounded cardinality)."""
    if tenant_id in _seen:
        return tenant_id
    with _lock:
        if len(_seen) < MAX_TENANT_LABELS:
            _seen.add(tenant_id)
            return tenant_id
    return "other"


MAX_LABELLED_CHILDREN = 50_000
"""Labelled counter children kept for reuse; past this, calls look theirs up in prometheus_client as before."""

_request_children: dict[tuple[str, str, str, str], Counter] = {}


def count_request(service: str, method: str, tenant: str, code: str) -> None:
    """REQUESTS.labels(service, method, tenant, code).inc(), without prometheus_client's per-call label lookup.

    The child is the one .labels() returns (prometheus_client keeps one per label tuple), so the samples are the
    same. Bounded: methods are the registered ones, tenant labels pass tenant_label, codes are gRPC's.
    """
    key = (service, method, tenant, code)
    child = _request_children.get(key)
    if child is None:
        child = REQUESTS.labels(service, method, tenant, code)
        if len(_request_children) < MAX_LABELLED_CHILDREN:
            _request_children[key] = child
    child.inc()


def serve_metrics(port: int, addr: str = "127.0.0.1") -> None:
    """Expose /metrics on port (0 disables)."""
    if port:
        start_http_server(port, addr=addr)
