"""OpenTelemetry tracing: one tracer provider per process, OTLP export when configured."""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_provider: TracerProvider | None = None


def setup_telemetry(
    service: str, otlp_endpoint: str | None = None, extra_processors: tuple[SpanProcessor, ...] = ()
) -> TracerProvider:
    """Install the process's tracer provider; spans go to otlp_endpoint (Jaeger's OTLP intake) when given."""
    global _provider
    if _provider is not None:
        return _provider
    provider = TracerProvider(resource=Resource.create({"service.name": f"bulkhead-{service}"}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    for processor in extra_processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_telemetry() -> None:
    """Flush spans still buffered (at shutdown)."""
    if _provider is not None:
        _provider.shutdown()


def client_interceptors() -> list:
    """The OpenTelemetry client interceptors (inject W3C traceparent on every call)."""
    return list(aio_client_interceptors())


_W3C = TraceContextTextMapPropagator()


def current_traceparent() -> str:
    """The W3C traceparent of the current span ("" outside one), to store with work done later."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent", "")


def attach_traceparent(traceparent: str):
    """Make a stored traceparent the current context, so background work continues its request's trace.

    Returns the token for opentelemetry.context.detach (None when there was nothing to attach).
    """
    if not traceparent:
        return None
    return otel_context.attach(_W3C.extract({"traceparent": traceparent}))


def detach(token) -> None:
    """Undo attach_traceparent."""
    if token is not None:
        otel_context.detach(token)
