"""OpenTelemetry tracing: one tracer provider per process, OTLP export when configured."""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator


class _Provider(TracerProvider):
    """The process's tracer provider, knowing whether any of its spans goes anywhere."""

    exporting = False
    """Whether a span processor (the OTLP exporter, a test's in-memory one) was added."""

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self.exporting = True


_provider: _Provider | None = None


def setup_telemetry(
    service: str, otlp_endpoint: str | None = None, extra_processors: tuple[SpanProcessor, ...] = ()
) -> TracerProvider:
    """Install the process's tracer provider; spans go to otlp_endpoint (Jaeger's OTLP intake) when given."""
    global _provider
    if _provider is not None:
        return _provider
    provider = _Provider(resource=Resource.create({"service.name": f"bulkhead-{service}"}))
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


def exporting() -> bool:
    """Whether this process's spans go anywhere. Without an exporter a CLIENT span per outgoing call is
    work for nothing (OpenTelemetry's client interceptor cost about 70 us of CPU per call: bench/interceptor.py)."""
    return _provider is not None and _provider.exporting


def trace_headers() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata (traceparent; tracestate and baggage when set): what
    OpenTelemetry's client interceptor injects, without a span of the call's own."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


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
