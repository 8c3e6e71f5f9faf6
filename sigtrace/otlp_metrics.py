"""Metrics over OTLP: the six families pushed now and then, read from the scrape's own core.

With ``OTEL_METRICS_EXPORTER=otlp`` a background thread reads every family's
:meth:`~sigtrace.metrics.MetricFamily.snapshot` each ``OTEL_METRIC_EXPORT_INTERVAL``
milliseconds (default 60000), turns it into the SDK's ``MetricsData`` and hands
it to the OTLP metric exporter (gRPC or HTTP, per ``OTEL_EXPORTER_OTLP_*``).
Nothing is added to a send or a request: the export reads the same in-memory
values a Prometheus scrape reads, on its own thread.

OTLP names are chosen so that the standard OTLP-to-Prometheus translation
(``.`` to ``_``, the unit's Prometheus suffix, ``_total`` for monotonic sums;
units in braces are annotations and add nothing) gives back the scrape's names:
``sigtrace.receiver.duration`` (unit ``s``) is ``sigtrace_receiver_duration_seconds``,
``sigtrace.signal.sends`` (a monotonic sum) is ``sigtrace_signal_sends_total``.

Why not the SDK's ``PeriodicExportingMetricReader``: the Python SDK (1.45) has
no ``MetricProducer``, and a reader collects only through a ``MeterProvider``'s
instruments (``MetricReader.collect`` is final). These values are not SDK
instruments, so the schedule (one thread, the interval, a last export at exit,
a new thread after fork) is written here, run by :mod:`sigtrace.lifecycle`;
protocol, endpoint, headers, compression, TLS, timeouts and retries are the
OTLP exporters' own.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
import typing as t
import uuid
from collections.abc import Mapping

from . import lifecycle
from .config import ConfigError
from .metrics import HistogramValue, MetricSet
from .version import __version__

__all__ = [
    "OTLP_NAMES",
    "OtlpMetricsPusher",
    "metrics_data",
    "otlp_requested",
    "start",
    "stop",
]

log = logging.getLogger("sigtrace")

OTLP_NAMES: dict[str, tuple[str, str]] = {
    "sigtrace_signal_sends_total": ("sigtrace.signal.sends", "{send}"),
    "sigtrace_signal_duration_seconds": ("sigtrace.signal.duration", "s"),
    "sigtrace_receiver_duration_seconds": ("sigtrace.receiver.duration", "s"),
    "sigtrace_receiver_errors_total": ("sigtrace.receiver.errors", "{error}"),
    "sigtrace_http_request_duration_seconds": ("sigtrace.http.request.duration", "s"),
    "sigtrace_http_request_exceptions_total": ("sigtrace.http.request.exceptions", "{exception}"),
}
"""Prometheus family name -> (OTLP metric name, UCUM unit)."""

DEFAULT_INTERVAL_MS = 60_000.0
DEFAULT_TIMEOUT_MS = 30_000.0
EXIT_EXPORT_SECONDS = 2.0
"""How long the exit hook lets the last export run (a dead collector must not
hold a worker's shutdown for the exporter's whole retry schedule)."""


def otlp_requested(environ: Mapping[str, str] | None = None) -> bool:
    """``OTEL_METRICS_EXPORTER`` lists ``otlp`` (and ``OTEL_SDK_DISABLED`` is not true)."""
    environ = os.environ if environ is None else environ
    names = {n.strip().lower() for n in environ.get("OTEL_METRICS_EXPORTER", "").split(",")}
    disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    return "otlp" in names and not disabled


def _milliseconds(environ: Mapping[str, str], key: str, default: float) -> float:
    raw = environ.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{key}={raw!r} (from the environment) is invalid: expected a positive "
            "number of milliseconds"
        )
    return value


def _protocol(environ: Mapping[str, str]) -> str:
    key = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"
    raw = environ.get(key, "").strip()
    if not raw:
        key = "OTEL_EXPORTER_OTLP_PROTOCOL"
        raw = environ.get(key, "").strip()
    protocol = raw or "grpc"
    if protocol not in ("grpc", "http/protobuf"):
        raise ConfigError(
            f"{key}={raw!r} (from the environment) is invalid: expected 'grpc' or "
            "'http/protobuf' (with OTEL_METRICS_EXPORTER=otlp)"
        )
    return protocol


def _exporter(protocol: str, environ: Mapping[str, str]) -> t.Any:
    """The SDK's OTLP metric exporter, given the settings sigtrace validated
    (:func:`sigtrace.tracing.otlp_exporter_options`); it reads the endpoint,
    headers and certificates itself."""
    from .tracing import otlp_exporter_options

    options = otlp_exporter_options("METRICS", protocol, None)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(**options)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HTTPMetricExporter,
    )

    return HTTPMetricExporter(**options)


def metrics_data(
    metrics: MetricSet, resource: t.Any, start_ns: int, now_ns: int | None = None
) -> t.Any:
    """The families' current values as the SDK's ``MetricsData`` (cumulative)."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Histogram,
        HistogramDataPoint,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    now = time.time_ns() if now_ns is None else now_ns
    cumulative = AggregationTemporality.CUMULATIVE
    out = []
    for family in metrics.families:
        name, unit = OTLP_NAMES[family.name]
        data: t.Any
        if family.kind == "counter":
            points = [
                NumberDataPoint(
                    attributes=dict(zip(family.labelnames, values, strict=True)),
                    start_time_unix_nano=start_ns,
                    time_unix_nano=now,
                    value=_number(t.cast(float, value)),
                )
                for values, value in family.tally_samples()
            ]
            data = Sum(data_points=points, aggregation_temporality=cumulative, is_monotonic=True)
        else:
            bounds = tuple(family.bounds[:-1])  # OTLP's last bucket is implicitly +Inf
            hpoints = []
            for values, value in family.tally_samples():
                assert isinstance(value, HistogramValue)
                counts = [int(c) for c in value.counts]
                extra: dict[str, t.Any] = {}
                if _sdk_has_exemplars():
                    extra["exemplars"] = _exemplars(value.exemplars)
                hpoints.append(
                    HistogramDataPoint(
                        attributes=dict(zip(family.labelnames, values, strict=True)),
                        start_time_unix_nano=start_ns,
                        time_unix_nano=now,
                        count=sum(counts),
                        sum=value.sum,
                        bucket_counts=counts,
                        explicit_bounds=bounds,
                        # not tracked by the core; None leaves OTLP's optional fields unset
                        min=t.cast(float, None),
                        max=t.cast(float, None),
                        **extra,
                    )
                )
            data = Histogram(data_points=hpoints, aggregation_temporality=cumulative)
        out.append(Metric(name=name, description=family.documentation, unit=unit, data=data))
    scope = InstrumentationScope("sigtrace", __version__)
    return MetricsData(
        resource_metrics=[
            ResourceMetrics(
                resource=resource,
                scope_metrics=[ScopeMetrics(scope=scope, metrics=out, schema_url="")],
                schema_url="",
            )
        ]
    )


@functools.cache
def _sdk_has_exemplars() -> bool:
    try:
        from opentelemetry.sdk.metrics import Exemplar  # noqa: F401
    except ImportError:  # opentelemetry-sdk < 1.27: data points carry no exemplars
        return False
    return True


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _exemplars(exemplars: t.Sequence[t.Any]) -> list[t.Any]:
    """Prometheus exemplars (labels ``trace_id``, maybe ``span_id``) as the SDK's.

    OTLP carries a trace id in its own field only together with a span id; an
    exemplar without one keeps ``trace_id`` as an attribute, which the
    OTLP-to-Prometheus translation turns into the same exemplar label.
    """
    from opentelemetry.sdk.metrics import Exemplar

    out = []
    for exemplar in exemplars:
        if exemplar is None:
            continue
        labels = dict(exemplar.labels)
        trace_id, span_id = labels.get("trace_id"), labels.get("span_id")
        time_ns = int((exemplar.timestamp or 0) * 1e9)
        if trace_id and span_id:
            rest = {k: v for k, v in labels.items() if k not in ("trace_id", "span_id")}
            out.append(Exemplar(rest, exemplar.value, time_ns, int(span_id, 16), int(trace_id, 16)))
        else:
            out.append(Exemplar(labels, exemplar.value, time_ns))
    return out


class OtlpMetricsPusher:
    """Exports :func:`metrics_data` every ``interval`` seconds on one thread.

    Its :attr:`component` is what :mod:`sigtrace.lifecycle` starts, stops,
    restarts in a forked child and stops at exit (with one last export).
    """

    def __init__(
        self,
        metrics: MetricSet,
        exporter: t.Any,
        resource: t.Any,
        interval: float,
        timeout: float,
        new_exporter: t.Callable[[], t.Any] | None = None,
    ) -> None:
        self.metrics = metrics
        self.exporter = exporter
        # A forked child builds its own: the parent's holds its connections.
        self._new_exporter = new_exporter
        self.resource = resource
        self.interval = interval
        self.timeout = timeout
        self.start_ns = time.time_ns()
        self._export_lock = threading.Lock()
        # The last export runs on the pusher's own thread: Python 3.12 starts none at exit.
        self._thread = lifecycle.Periodic(
            "sigtrace-otlp-metrics", interval, self.export, final=self._last_export
        )
        self.component = lifecycle.Component(
            "sigtrace-otlp-metrics",
            lifecycle.Order.OTLP_METRICS,
            start=self._thread.start,
            stop=self.stop,
            after_fork_in_child=self.after_fork_in_child,
            at_exit=self.stop,
        )

    def _last_export(self) -> None:
        self.export(timeout=EXIT_EXPORT_SECONDS)

    def export(self, timeout: float | None = None) -> None:
        """Export the current values once; failures are logged, never raised."""
        try:
            with self._export_lock:
                data = metrics_data(self.metrics, self.resource, self.start_ns)
                seconds = self.timeout if timeout is None else timeout
                self.exporter.export(data, timeout_millis=seconds * 1000)
        except Exception:
            log.warning("sigtrace: exporting metrics over OTLP failed", exc_info=True)

    def after_fork_in_child(self) -> None:
        """A forked child exports its own values: new start time, new instance,
        new exporter (the parent's keeps the parent's connections), new thread.

        The values it copied are zeroed before this runs (by the metrics'
        own fork handling, or the multiprocess publisher), so the child's
        cumulative series start from its own first send.
        """
        self._export_lock = threading.Lock()
        if self._new_exporter is not None:
            try:
                self.exporter = self._new_exporter()
            except Exception:  # it was built in the parent from the same environment
                log.warning("sigtrace: a forked child cannot build its OTLP metric exporter; "
                            "it uses its parent's", exc_info=True)  # fmt: skip
        self.start_ns = time.time_ns()
        self.resource = _with_instance_id(self.resource, fresh=True)
        self._thread.start()

    def stop(self, last_export: bool = True) -> None:
        """Stop the thread; export once more (at most :data:`EXIT_EXPORT_SECONDS`)."""
        # The thread may be mid-export to a dead collector: wait for both exports.
        self._thread.stop(timeout=2 * EXIT_EXPORT_SECONDS, final=last_export)
        try:
            self.exporter.shutdown(timeout_millis=EXIT_EXPORT_SECONDS * 1000)
        except Exception:
            log.debug("sigtrace: OTLP metric exporter shutdown failed", exc_info=True)


def _with_instance_id(resource: t.Any, fresh: bool = False) -> t.Any:
    """``service.instance.id`` (unique per process) unless the user set one.

    Each process (a gunicorn worker) pushes its own cumulative series; the id
    keeps them apart (Prometheus's translation makes it the ``instance`` label).
    """
    from opentelemetry.sdk.resources import Resource

    key = "service.instance.id"
    if key in resource.attributes and not fresh:
        return resource
    if fresh and os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").find(key + "=") >= 0:
        return resource
    return resource.merge(Resource({key: str(uuid.uuid4())}))


class _Running:
    """The process's one pusher, if any, and the lock that makes it one."""

    def __init__(self) -> None:
        self.lock = lifecycle.ForkSafeLock()
        self.pusher: OtlpMetricsPusher | None = None


_running = _Running()


def start(metrics: MetricSet, service_name: str | None) -> OtlpMetricsPusher | None:
    """Start pushing ``metrics`` over OTLP when ``OTEL_METRICS_EXPORTER`` asks for it.

    ``service_name`` (the Flask app's name) is used when ``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` name none; None keeps the SDK's resource as is.

    One pusher per process, counted: each call that returns one must be
    matched by one :func:`stop`. Returns None and starts nothing without the
    variable. Raises :class:`ConfigError` for a bad protocol, interval or
    timeout; an exporter that cannot be built from the environment is logged
    as an error and nothing is pushed.
    """
    environ = os.environ
    if not otlp_requested(environ):
        return None
    with _running.lock:
        if _running.pusher is not None:
            lifecycle.acquire(_running.pusher.component)
            return _running.pusher
        protocol = _protocol(environ)
        interval = _milliseconds(environ, "OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_INTERVAL_MS)
        timeout = _milliseconds(environ, "OTEL_METRIC_EXPORT_TIMEOUT", DEFAULT_TIMEOUT_MS)
        try:
            exporter = _exporter(protocol, environ)
        except Exception:
            log.error(
                "sigtrace: the OTLP metric exporter could not be set up from the OTEL_* "
                "environment; metrics are not pushed",
                exc_info=True,
            )
            return None
        from opentelemetry.sdk.resources import Resource

        from .tracing import sdk_resource

        base = sdk_resource(service_name) if service_name else Resource.create()
        resource = _with_instance_id(base)
        pusher = OtlpMetricsPusher(
            metrics,
            exporter,
            resource,
            interval / 1000,
            timeout / 1000,
            new_exporter=functools.partial(_exporter, protocol, environ),
        )
        lifecycle.acquire(pusher.component)
        _running.pusher = pusher
        return pusher


def stop(pusher: OtlpMetricsPusher) -> None:
    """Undo one :func:`start` that returned ``pusher``; the last one stops it
    after one last export (at exit, :mod:`sigtrace.lifecycle` stops it)."""
    with _running.lock:
        if lifecycle.release(pusher.component) and _running.pusher is pusher:
            _running.pusher = None
