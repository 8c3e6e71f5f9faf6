"""Tracer lookup, span helpers and, when asked, SDK + OTLP set-up.

Span and attribute names used by sigtrace live here, so the docs, the
exporters and the tests agree on one spelling.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
import typing as t

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.semconv.attributes.code_attributes import CODE_FUNCTION_NAME
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from . import lifecycle
from .version import __version__

__all__ = [
    "ATTR_APP_NAME",
    "ATTR_KWARG_PREFIX",
    "ATTR_RECEIVERS_CALLED",
    "ATTR_SIGNAL_NAME",
    "CODE_FUNCTION_NAME",
    "ERROR_TYPE",
    "SpanMode",
    "get_tracer",
    "CONTEXT_VAR",
    "attach",
    "reset",
    "current_context",
    "mark_error",
    "recording_parent",
    "sdk_component",
    "setup_sdk",
]

log = logging.getLogger("sigtrace")

ATTR_SIGNAL_NAME = "blinker.signal.name"
ATTR_RECEIVERS_CALLED = "blinker.receivers.called"
"""Receivers the send called (a raising receiver included, later ones not)."""
ATTR_KWARG_PREFIX = "blinker.kwargs."
ATTR_APP_NAME = "flask.app.name"

SpanMode = t.Literal["all", "signals", "receivers", "slow", "none"]
SPAN_MODES: tuple[str, ...] = ("all", "signals", "receivers", "slow", "none")

DEFAULT_SLOW_THRESHOLD = 0.001
"""Seconds a send or receiver takes before ``slow`` exports its span."""

INTERNAL = SpanKind.INTERNAL

TRACER_NAME = "sigtrace"
"""The instrumentation scope of sigtrace's spans."""


def _span_key() -> str:
    """The key the current span has in a Context, learnt through the public API."""
    (key,) = trace.set_span_in_context(INVALID_SPAN, Context()).keys()
    return key


SPAN_KEY = _span_key()


def _context_var() -> contextvars.ContextVar[Context] | None:
    """The ContextVar behind ``opentelemetry.context`` with the default runtime
    context (``ContextVarsRuntimeContext``); None with any other runtime context.

    The public functions are a few Python calls in front of its own C ``get``
    and ``set`` (about 0.2 µs with ``get_current_span().is_recording()``,
    which every send pays). Hand-written because the API offers no cheaper
    check; tests compare the answers.
    """
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    if type(runtime).__name__ == "ContextVarsRuntimeContext" and isinstance(
        var, contextvars.ContextVar
    ):
        return var
    return None


CONTEXT_VAR = _context_var()


def _context_getter() -> t.Callable[[], Context]:
    """The cheapest callable that returns ``opentelemetry.context.get_current()``."""
    return CONTEXT_VAR.get if CONTEXT_VAR is not None else otel_context.get_current


current_context = _context_getter()

attach: t.Callable[[Context], contextvars.Token[Context]] = (
    CONTEXT_VAR.set if CONTEXT_VAR is not None else otel_context.attach
)
"""``opentelemetry.context.attach``, straight through the ContextVar when it can (its
token is one ``opentelemetry.context.detach`` takes)."""

reset: t.Callable[[contextvars.Token[Context]], None] = (
    CONTEXT_VAR.reset if CONTEXT_VAR is not None else otel_context.detach
)
"""``opentelemetry.context.detach``, straight through the ContextVar when it can; unlike
``detach`` it raises what the ContextVar raises (a token of another context): catch it
and call ``detach``, which logs it as OpenTelemetry does."""


def recording_parent() -> bool:
    """``trace.get_current_span().is_recording()``, at a third of the cost."""
    span = t.cast("Span | None", current_context().get(SPAN_KEY))
    return span is not None and span.is_recording()


def get_tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    """sigtrace's tracer from ``provider``, else from the global provider.

    Without a provider the API returns a proxy that follows a global provider
    configured later (after fork, after sigtrace was imported).
    """
    if provider is None:
        return trace.get_tracer(TRACER_NAME, __version__)
    return provider.get_tracer(TRACER_NAME, __version__)


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


def _fits_int64(value: int) -> bool:
    return -(2**63) <= value < 2**63


def kwarg_attributes(keys: frozenset[str], kwargs: dict[str, t.Any]) -> dict[str, t.Any]:
    """Attributes for the kwargs the user allow-listed, values made safe."""
    attributes: dict[str, t.Any] = {}
    for key in keys:
        if key in kwargs:
            value = kwargs[key]
            if isinstance(value, int) and not isinstance(value, bool) and not _fits_int64(value):
                value = str(value)  # OTLP ints are int64: the exporter would drop it
            elif not isinstance(value, (str, bool, int, float)):
                value = str(value)
            if isinstance(value, str):
                # Lone surrogates are not UTF-8: the exporter would drop the value.
                value = value[:256].encode("utf-8", "replace").decode("utf-8")
            attributes[ATTR_KWARG_PREFIX + key] = value
    return attributes


# --------------------------------------------------------------------------
# SDK set-up (only when the user configured no provider but an OTLP endpoint)

EXIT_FLUSH_SECONDS = 2.0
"""How long the exit hook waits for the last spans: a healthy collector takes
milliseconds, a dead one would hold the process (a gunicorn worker, a pod) for
the exporter's whole retry schedule, about 8 s with the default timeout, and
one that never answers for the whole export timeout (10 s by default)."""

EXIT_STOP_SECONDS = 1.0
"""How long the exit hook then waits for the stopped exporter to return (gRPC
cancels its call in flight); an HTTP request in flight cannot be interrupted
and is left to its daemon thread."""

EXPORTER_LOG_INTERVAL = 60.0
"""Seconds between two identical log messages of the OTLP exporters."""

# Loggers the OTLP span exporters report failed batches on (one line or two per
# batch, for as long as the collector is down).
EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.common.http",
)


class _Sdk:
    """The provider sigtrace installed, if any, its exporter and log filters."""

    def __init__(self) -> None:
        self.lock = lifecycle.ForkSafeLock()
        self.provider: t.Any = None
        self.exporter: _OnceShutdownExporter | None = None
        self.log_filters: list[tuple[logging.Logger, logging.Filter]] = []


_sdk = _Sdk()


def otlp_endpoint_configured(own_endpoint: str | None = None) -> bool:
    """True when an OTLP traces endpoint is configured by env or sigtrace config."""
    from .config import first_otel_value

    endpoint = first_otel_value(
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    return bool(own_endpoint or endpoint)


def traces_exporters(environ: t.Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``OTEL_TRACES_EXPORTER`` as names (``()`` when unset), validated.

    ``otlp``, ``console`` or both (comma-separated), or ``none``; anything else
    raises :class:`~sigtrace.config.ConfigError` naming the value.
    """
    from .config import OTEL_KEYS, ConfigError

    environ = os.environ if environ is None else environ
    raw = environ.get("OTEL_TRACES_EXPORTER", "")
    try:
        names: tuple[str, ...] = OTEL_KEYS["OTEL_TRACES_EXPORTER"].parse(raw)
    except TypeError as expected:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={raw!r} (from the environment) is invalid: expected "
            f"{expected}; fix it or unset it where the process is started"
        ) from None
    return names


def user_configured_provider() -> bool:
    """True when the global TracerProvider is a real one set by someone."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def sdk_disabled() -> bool:
    """``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``: the user wants no SDK."""
    from .config import otel_value

    return bool(otel_value("OTEL_SDK_DISABLED")) or otel_value("OTEL_TRACES_EXPORTER") == ("none",)


def sdk_resource(default_service_name: str) -> t.Any:
    """The SDK resource from ``OTEL_*``, named ``default_service_name`` if the user did not.

    ``OTEL_SERVICE_NAME``, then ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``,
    win over the default (the Flask app's name); the SDK's own attributes and
    the user's other resource attributes are kept.
    """
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()  # reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    named = str(resource.attributes.get(SERVICE_NAME) or "")
    if not named or named.startswith("unknown_service"):  # the SDK's placeholder
        resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
    return resource


def setup_sdk(
    service_name: str,
    endpoint: str | None = None,
    console: bool = False,
    otlp: bool | None = None,
) -> t.Any:
    """Install an SDK TracerProvider exporting over OTLP, to the console, or both.

    ``otlp`` defaults to ``not console``.

    Does nothing and returns None when a provider is already configured (sigtrace
    never replaces the user's), when ``OTEL_SDK_DISABLED=true`` or
    ``OTEL_TRACES_EXPORTER=none``, or when the exporter cannot be built from the
    environment (logged as an error: the app still starts, without export). The
    exporter follows ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc``, the default, or
    ``http/protobuf``) and every standard ``OTEL_*`` exporter variable (headers,
    timeout, compression, insecure, certificates), which the OTLP exporters read
    themselves. Spans go through a BatchSpanProcessor, so a dead endpoint never
    blocks a request; its failures are logged at most once a minute per
    message. At exit the last spans are flushed, waiting at most
    :data:`EXIT_FLUSH_SECONDS`.

    The provider is a :mod:`sigtrace.lifecycle` component (:func:`sdk_component`)
    with one user, this call: its last release (or the exit) flushes the spans
    and shuts the provider down.
    """
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    with _sdk.lock:
        if _sdk.provider is not None or user_configured_provider() or sdk_disabled():
            return None
        use_otlp = not console if otlp is None else otlp
        try:
            exporter = _otlp_exporter(endpoint) if use_otlp else None
        except Exception:
            log.error(
                "sigtrace: the OTLP span exporter could not be set up from the OTEL_* "
                "environment; spans are not exported",
                exc_info=True,
            )
            return None
        if exporter is None and not console:
            return None
        # shut down by SDK's at_exit (sigtrace.lifecycle), with a deadline; not by its own hook
        provider = TracerProvider(
            resource=sdk_resource(service_name),
            span_limits=_span_limits(),
            shutdown_on_exit=False,
        )
        once = None
        batch = _batch_options()
        if exporter is not None:
            once = _OnceShutdownExporter(exporter)
            # the wrapper is a SpanExporter by duck typing (export, shutdown, force_flush)
            provider.add_span_processor(BatchSpanProcessor(t.cast(t.Any, once), **batch))
        if console:
            provider.add_span_processor(BatchSpanProcessor(_console_exporter(), **batch))
        trace.set_tracer_provider(provider)
        _sdk.provider, _sdk.exporter = provider, once
        if once is not None:
            _limit_exporter_logs()
        lifecycle.acquire(SDK)
        return provider


def sdk_component() -> lifecycle.Component | None:
    """The lifecycle component of the provider sigtrace installed, if it did."""
    return SDK if _sdk.provider is not None else None


_SPAN_LIMITS = {
    "OTEL_ATTRIBUTE_COUNT_LIMIT": "max_attributes",
    "OTEL_SPAN_EVENT_COUNT_LIMIT": "max_events",
    "OTEL_SPAN_LINK_COUNT_LIMIT": "max_links",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "max_span_attributes",
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT": "max_event_attributes",
    "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT": "max_link_attributes",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "max_attribute_length",
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "max_span_attribute_length",
}
"""The SDK's span-limit variables and the ``SpanLimits`` argument each one sets."""


def _span_limits() -> t.Any:
    """The SDK's span limits, each bad ``OTEL_*`` limit replaced by its default (the
    SDK would raise on it): a valid one is left for the SDK to read, so its
    precedence between the span and the global limits holds."""
    from opentelemetry.sdk.trace import SpanLimits

    from .config import OTEL_KEYS, otel_value

    given: dict[str, int] = {}
    for name, argument in _SPAN_LIMITS.items():
        raw = os.environ.get(name, "").strip()
        if raw and otel_value(name) == OTEL_KEYS[name].default:
            given[argument] = t.cast(int, OTEL_KEYS[name].default)  # bad or the default anyway
    return SpanLimits(**given)


def _batch_options() -> dict[str, t.Any]:
    """The batch span processor's ``OTEL_BSP_*`` settings, validated (the SDK raises
    on a bad one): each variable's value, else its default."""
    from .config import otel_value

    queue = otel_value("OTEL_BSP_MAX_QUEUE_SIZE")
    return {
        "max_queue_size": queue,
        "schedule_delay_millis": otel_value("OTEL_BSP_SCHEDULE_DELAY"),
        "max_export_batch_size": min(otel_value("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), queue),
        "export_timeout_millis": otel_value("OTEL_BSP_EXPORT_TIMEOUT"),
    }


def otlp_exporter_options(
    signal: t.Literal["TRACES", "METRICS"], protocol: str, endpoint: str | None
) -> dict[str, t.Any]:
    """Keyword arguments for the SDK's OTLP exporter of ``signal`` (``TRACES`` or
    ``METRICS``) over ``protocol``: every setting sigtrace validated (a bad one was
    warned about by :func:`sigtrace.config.check_environment` and is the default
    here), passed rather than left to the exporter, which raises on some bad values
    in some SDK versions; headers and certificates the exporter reads itself."""
    from .config import first_otel_value, otlp_insecure

    def setting(suffix: str) -> t.Any:
        return first_otel_value(
            (f"OTEL_EXPORTER_OTLP_{signal}_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}")
        )

    compression = setting("COMPRESSION")
    options: dict[str, t.Any] = {"timeout": setting("TIMEOUT")}
    if endpoint:
        options["endpoint"] = endpoint
    if protocol == "grpc":
        from grpc import Compression  # type: ignore[import-untyped]

        options["insecure"] = otlp_insecure(signal, endpoint)
        # the gRPC exporter knows only gzip (and raises on "none")
        options["compression"] = {
            "gzip": Compression.Gzip,
            "deflate": Compression.Deflate,
            "none": Compression.NoCompression,
        }[compression]
    else:
        from opentelemetry.exporter.otlp.proto.http import Compression as HTTPCompression

        options["compression"] = HTTPCompression(compression)
    return options


def _otlp_exporter(endpoint: str | None) -> t.Any:
    """The OTLP span exporter (see :func:`otlp_exporter_options`)."""
    from .config import first_otel_value

    protocol = first_otel_value(
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(**otlp_exporter_options("TRACES", "grpc", endpoint))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HTTPSpanExporter(**otlp_exporter_options("TRACES", protocol, endpoint))


def _console_exporter() -> t.Any:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    from .console import format_span

    return ConsoleSpanExporter(formatter=format_span)


class RateLimitFilter(logging.Filter):
    """Let one record per (level, message template) through every ``interval`` seconds.

    A dead collector makes the OTLP exporters log each failed batch, forever.
    The first failure is what an operator needs, then a reminder now and then
    that says how many were held back.
    """

    def __init__(self, interval: float = EXPORTER_LOG_INTERVAL) -> None:
        super().__init__()
        self.interval = interval
        self._lock = lifecycle.ForkSafeLock()
        self._last: dict[tuple[int, str], float] = {}
        self._held: dict[tuple[int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            # no "%" in the suffix: the record is still formatted with its args
            record.msg = (
                f"{record.msg} [sigtrace: {held} similar messages held back in the "
                f"last {self.interval:.0f} s]"
            )
        return True


def _limit_exporter_logs() -> None:
    for name in EXPORTER_LOGGERS:
        logger = logging.getLogger(name)
        log_filter = RateLimitFilter()
        logger.addFilter(log_filter)
        _sdk.log_filters.append((logger, log_filter))


class _OnceShutdownExporter:
    """The OTLP exporter, whose shutdown runs once, whoever calls it first.

    The exit hook shuts the exporter down early to cut a dead collector's
    retries short; the batch processor's own shutdown call then does nothing.
    """

    def __init__(self, exporter: t.Any) -> None:
        self.exporter = exporter
        self._lock = lifecycle.ForkSafeLock()
        self._closed = False

    def export(self, spans: t.Any) -> t.Any:
        return self.exporter.export(spans)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.exporter.force_flush(timeout_millis))

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.exporter.shutdown()


def shutdown_sdk() -> None:
    """Flush and shut down the provider sigtrace installed, if any.

    Waits at most :data:`EXIT_FLUSH_SECONDS` for the last export, then stops
    the exporter (aborting its retries) and waits at most
    :data:`EXIT_STOP_SECONDS` more. Runs at exit and at the last release of
    :func:`sdk_component`; calling it again does nothing.
    """
    with _sdk.lock:
        provider, _sdk.provider = _sdk.provider, None
        exporter, _sdk.exporter = _sdk.exporter, None
        filters = list(_sdk.log_filters)
        _sdk.log_filters.clear()
    if provider is not None:
        # provider.shutdown() flushes through the batch processor
        _exit_flush.run(provider.shutdown, exporter.shutdown if exporter else _noop)
    for logger, log_filter in filters:
        logger.removeFilter(log_filter)


def _noop() -> None:
    return None


class _ExitFlush:
    """Runs the provider's shutdown on a thread started ahead of time, waiting
    for it at most :data:`EXIT_FLUSH_SECONDS`, then stops the exporter and
    waits at most :data:`EXIT_STOP_SECONDS` more.

    The shutdown joins the batch processor's thread, which may be in an export
    that nothing interrupts (an HTTP request to a collector that accepted the
    connection and never answers, until the export timeout); on its own
    (daemon) thread it holds up neither the exit nor ``close()``. The thread is
    started ahead of time (by :data:`SDK`'s start, and again in a forked
    child), since Python 3.12 refuses to start a thread in an ``atexit`` hook,
    where the flush runs. Written here because the SDK's shutdown takes no
    deadline.
    """

    def __init__(self) -> None:
        self._go = threading.Event()
        self._done = threading.Event()
        self._job: t.Callable[[], object] = _noop
        self._thread: threading.Thread | None = None

    def ready(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._go, self._done = threading.Event(), threading.Event()
            self._thread = lifecycle.spawn("sigtrace-exit-flush", self._run)

    def _run(self) -> None:
        self._go.wait()
        try:
            self._job()
        except Exception:
            log.debug("sigtrace: shutting the tracer provider down failed", exc_info=True)
        finally:
            self._done.set()

    def run(self, flush: t.Callable[[], object], stop: t.Callable[[], object]) -> None:
        """``flush()`` on the thread, then ``stop()`` if it did not end in time."""
        try:
            self.ready()
        except RuntimeError:  # at interpreter shutdown, with no thread started: inline
            flush()
            return
        thread, done = self._thread, self._done
        self._job, self._thread = flush, None  # the thread runs once
        self._go.set()
        if not done.wait(EXIT_FLUSH_SECONDS):
            try:
                stop()
            except Exception:
                log.debug("sigtrace: stopping the span exporter failed", exc_info=True)
            if not done.wait(EXIT_STOP_SECONDS):
                return  # left to its daemon thread
        if thread is not None:
            thread.join(EXIT_STOP_SECONDS)  # ending: done is its last step

    def after_fork_in_child(self) -> None:
        self._thread = None  # the parent's does not run here
        if _sdk.provider is not None:
            self.ready()


_exit_flush = _ExitFlush()
SDK = lifecycle.Component(
    "sigtrace-tracer-provider",
    lifecycle.Order.TRACING,
    start=_exit_flush.ready,
    stop=shutdown_sdk,
    after_fork_in_child=_exit_flush.after_fork_in_child,
    at_exit=shutdown_sdk,
)
"""The SDK provider sigtrace installed: its exit flush thread, its flush at exit."""
