"""Fixtures the tests of shared/ have in common."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.telemetry import setup_telemetry


@pytest.fixture
def spans():
    """The spans the process's tracer ends during the test, in order."""
    exporter = InMemorySpanExporter()
    provider = setup_telemetry("tests")
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()
