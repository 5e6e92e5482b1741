"""OpenTelemetry tracing: one tracer provider per process, OTLP export when configured."""
from __future__ import annotations

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_provider: TracerProvider | None = None


def setup_telemetry(service: str, otlp_endpoint: str | None = None,
                    extra_processors: tuple[SpanProcessor, ...] = ()) -> TracerProvider:
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


def server_interceptor():
    """The OpenTelemetry server interceptor (outermost, so our handler runs inside its span)."""
    return aio_server_interceptor()


def client_interceptors() -> list:
    """The OpenTelemetry client interceptors (inject W3C traceparent on every call)."""
    return list(aio_client_interceptors())
