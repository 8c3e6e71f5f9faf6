"""Tracer lookup, span helpers and, when asked, SDK + OTLP set-up.

Span and attribute names used by sigtrace live here, so the README, the
exporters and the tests agree on one spelling.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import typing as t

from opentelemetry import trace
from opentelemetry.semconv.attributes.code_attributes import CODE_FUNCTION_NAME
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

__all__ = [
    "ATTR_APP_NAME",
    "ATTR_KWARG_PREFIX",
    "ATTR_RECEIVERS_COUNT",
    "ATTR_SIGNAL_NAME",
    "CODE_FUNCTION_NAME",
    "ERROR_TYPE",
    "SpanMode",
    "get_tracer",
    "mark_error",
    "setup_sdk",
]

log = logging.getLogger("sigtrace")

ATTR_SIGNAL_NAME = "blinker.signal.name"
ATTR_RECEIVERS_COUNT = "blinker.receivers.count"
ATTR_KWARG_PREFIX = "blinker.kwargs."
ATTR_APP_NAME = "flask.app.name"

SpanMode = t.Literal["all", "signals", "receivers", "none"]
SPAN_MODES: tuple[str, ...] = ("all", "signals", "receivers", "none")

INTERNAL = SpanKind.INTERNAL


def get_tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    """sigtrace's tracer from ``provider``, else from the global provider.

    Without a provider the API returns a proxy that follows a global provider
    configured later (after fork, after sigtrace was imported).
    """
    from . import __version__

    if provider is None:
        return trace.get_tracer("sigtrace", __version__)
    return provider.get_tracer("sigtrace", __version__)


def qualified_class_name(exc: BaseException) -> str:
    """``error.type`` value: the exception's qualified class name."""
    kind = type(exc)
    module = kind.__module__
    if module in ("builtins", "__main__", None):
        return kind.__qualname__
    return f"{module}.{kind.__qualname__}"


def mark_error(span: Span, exc: BaseException) -> None:
    """Status ERROR, ``error.type`` and an exception event on ``span``."""
    span.set_attribute(ERROR_TYPE, qualified_class_name(exc))
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


def kwarg_attributes(keys: frozenset[str], kwargs: dict[str, t.Any]) -> dict[str, t.Any]:
    """Attributes for the kwargs the user allow-listed, values made safe."""
    attributes: dict[str, t.Any] = {}
    for key in keys:
        if key in kwargs:
            value = kwargs[key]
            if not isinstance(value, (str, bool, int, float)):
                value = str(value)
            if isinstance(value, str) and len(value) > 256:
                value = value[:256]
            attributes[ATTR_KWARG_PREFIX + key] = value
    return attributes


# --------------------------------------------------------------------------
# SDK set-up (only when the user configured no provider but an OTLP endpoint)

_sdk_lock = threading.Lock()
_sdk_provider: t.Any = None


def otlp_endpoint_configured(own_endpoint: str | None = None) -> bool:
    """True when an OTLP traces endpoint is configured by env or sigtrace config."""
    return bool(
        own_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def user_configured_provider() -> bool:
    """True when the global TracerProvider is a real one set by someone."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def setup_sdk(
    service_name: str,
    endpoint: str | None = None,
    console: bool = False,
) -> t.Any:
    """Install an SDK TracerProvider exporting over OTLP (or to the console).

    Does nothing and returns None when a provider is already configured: sigtrace
    never replaces the user's. The exporter follows ``OTEL_EXPORTER_OTLP_PROTOCOL``
    (``grpc``, the default, or ``http/protobuf``) and every standard ``OTEL_*``
    exporter variable (headers, timeout, compression, insecure, certificates),
    which the OTLP exporters read themselves. Spans go through a
    BatchSpanProcessor, so a dead endpoint never blocks a request; the provider
    is flushed and shut down at exit.
    """
    global _sdk_provider
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    with _sdk_lock:
        if _sdk_provider is not None or user_configured_provider():
            return None
        exporter = _console_exporter() if console else _otlp_exporter(endpoint)
        if exporter is None:
            return None
        if os.environ.get("OTEL_SERVICE_NAME"):
            resource = Resource.create()  # reads OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        else:
            resource = Resource.create({SERVICE_NAME: service_name})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _sdk_provider = provider
        atexit.register(provider.shutdown)
        return provider


def _otlp_exporter(endpoint: str | None) -> t.Any:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        return HTTPSpanExporter(endpoint=endpoint) if endpoint else HTTPSpanExporter()
    log.warning(
        "sigtrace: OTEL_EXPORTER_OTLP_PROTOCOL=%r is not supported (use 'grpc' or "
        "'http/protobuf'); spans are not exported",
        protocol,
    )
    return None


def _console_exporter() -> t.Any:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    from .console import format_span

    return ConsoleSpanExporter(formatter=format_span)


def shutdown_sdk() -> None:
    """Flush and shut down the provider sigtrace installed, if any."""
    global _sdk_provider
    with _sdk_lock:
        provider, _sdk_provider = _sdk_provider, None
    if provider is not None:
        provider.shutdown()
