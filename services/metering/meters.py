"""Prometheus metrics of metering: tokens, requests, cost and rejections by tenant and model."""

from __future__ import annotations

from weakref import WeakKeyDictionary

from prometheus_client import REGISTRY, CollectorRegistry, Counter

from services.metering.pricing import Tokens
from shared.metrics import tenant_label

_KINDS = ("input", "output", "cache_write", "cache_read")
MAX_MODEL_LABELS = 100
"""Distinct model label values; model names come from callers, so further ones count as "other"."""


class _Counters:
    """The counters registered in one registry (a registry takes each name once)."""

    def __init__(self, registry: CollectorRegistry):
        self.tokens = Counter(
            "bulkhead_metering_tokens_total", "Tokens recorded", ["tenant", "model", "kind"], registry=registry
        )
        self.requests = Counter(
            "bulkhead_metering_requests_total",
            "Model calls recorded",
            ["tenant", "model", "outcome"],
            registry=registry,
        )
        self.cost = Counter(
            "bulkhead_metering_cost_usd_total", "Cost recorded, USD", ["tenant", "model"], registry=registry
        )
        self.rejections = Counter(
            "bulkhead_metering_rejections_total",
            "Budget reservations and leases refused",
            ["tenant", "model", "reason"],
            registry=registry,
        )
        self.models: set[str] = set()


_REGISTERED: WeakKeyDictionary[CollectorRegistry, _Counters] = WeakKeyDictionary()
"""Counters by registry: a second metering in one process (tests, several meshes) counts into the same ones."""


class MeteringMetrics:
    """The counters; pass a fresh CollectorRegistry in tests, the default one in production.

    Registered once per registry: every MeteringMetrics of one registry shares them (and the model label cap).
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        counters = _REGISTERED.get(registry)
        if counters is None:
            counters = _REGISTERED[registry] = _Counters(registry)
        self.tokens, self.requests = counters.tokens, counters.requests
        self.cost, self.rejections = counters.cost, counters.rejections
        self._models = counters.models

    def _model(self, model: str) -> str:
        if model not in self._models and len(self._models) >= MAX_MODEL_LABELS:
            return "other"
        self._models.add(model)
        return model

    def recorded(
        self, tenant_id: str, model: str, outcome: str, tokens: Tokens, cost_usd: float, *, count: int = 1
    ) -> None:
        """Count newly recorded events of one model and outcome (tokens and cost summed over them)."""
        tenant, model = tenant_label(tenant_id), self._model(model)
        self.requests.labels(tenant, model, outcome).inc(count)
        for kind, value in zip(_KINDS, tokens.parts(), strict=True):
            if value:
                self.tokens.labels(tenant, model, kind).inc(value)
        if cost_usd:
            self.cost.labels(tenant, model).inc(cost_usd)

    def rejected(self, tenant_id: str, model: str, reason: str) -> None:
        """Count one refused reservation or lease."""
        self.rejections.labels(tenant_label(tenant_id), self._model(model), reason).inc()
