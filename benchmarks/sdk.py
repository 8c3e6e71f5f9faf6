"""OpenTelemetry SDK set-up shared by the span-making modes: real SDK, null exporters.

Spans go through the SDK's ``BatchSpanProcessor`` (what a production set-up
uses) into an exporter that only counts them, so that the span cost measured
is the SDK's and the instrumentation's, never a network's.
"""

from __future__ import annotations

import typing as t
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler

__all__ = ["NullSpanExporter", "meter_provider", "tracer_provider"]


class NullSpanExporter(SpanExporter):
    """Drops every span; counts them so a benchmark can show spans per request."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class NullMetricExporter(MetricExporter):
    """Drops every metric export."""

    def __init__(self) -> None:
        super().__init__(preferred_temporality={}, preferred_aggregation={})

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: t.Any
    ) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: t.Any) -> None:
        return None


def tracer_provider(
    *, sampler: Sampler = ALWAYS_ON, set_global: bool = False
) -> tuple[TracerProvider, NullSpanExporter]:
    """An SDK provider (default batch settings) exporting to a :class:`NullSpanExporter`."""
    exporter = NullSpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider, exporter


def meter_provider() -> MeterProvider:
    """An SDK meter provider whose reader exports to nothing, once a minute.

    Instruments aggregate on every record, as in production; the periodic
    collection is amortised over a minute of requests.
    """
    reader = PeriodicExportingMetricReader(NullMetricExporter(), export_interval_millis=60_000)
    return MeterProvider(metric_readers=[reader])
