"""The benchmarked app and its modes: ``GET /signup/<name>`` sends ``user-signed-up``
to three receivers that do nothing, so that the instrumentation is what is measured."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
import typing as t
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import flask
from blinker import Namespace
from opentelemetry import context, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

MODES: dict[str, str] = {  # per-request modes, in table order; -mp: multiprocess metrics
    "bare": "Flask alone",
    "pfe": 'prometheus-flask-exporter, `PrometheusMetrics(app, group_by="endpoint")`',
    "pfe-mp": "prometheus-flask-exporter, multiprocess: `GunicornInternalPrometheusMetrics`",
    "otel": "opentelemetry-instrumentation-flask, SDK provider, batch processor, null exporter",
    "otel+pfe": "both peers together",
    "floor": "the five spans sigtrace makes, made by hand with the SDK, nothing else",
    "sigtrace-metrics": "`SigTrace(app)`, `SIGTRACE_TRACING=false`",
    "sigtrace-metrics-mp": "the same, multiprocess (`PROMETHEUS_MULTIPROC_DIR` set)",
    "sigtrace-full": "`SigTrace(app)`, metrics and spans (request, signal, 3 receivers)",
    "sigtrace-full-mp": "the same, multiprocess",
    "sigtrace-none": "`SIGTRACE_SPANS=none`: the request span only, whatever the receivers",
    "sigtrace-none-mp": "the same, multiprocess",
    "sigtrace-slow": "`SIGTRACE_SPANS=slow`: receivers all fast, so the request span only",
    "sigtrace-slow-mp": "the same, multiprocess",
}
SIGNUP_PATH, SIGNAL_NAME = "/signup/alice", "user-signed-up"
_SIGNUP = frozenset({"signup", SIGNAL_NAME})  # the endpoint's and the signal's label values
_PFE = {"flask_http_request_duration_seconds_count": 1}  # samples per request
_SIGTRACE = {
    "sigtrace_http_request_duration_seconds_count": 1,
    "sigtrace_receiver_duration_seconds_count": 3,
}


def receiver(name: str) -> Callable[..., None]:
    """A receiver that does nothing, named ``name`` (one metric child per name)."""

    def receive(sender: t.Any, **kwargs: t.Any) -> None:
        return None

    receive.__qualname__ = receive.__name__ = name
    return receive


user_signed_up = Namespace().signal(SIGNAL_NAME)
RECEIVERS = tuple(receiver(n) for n in ("send_welcome_email", "count_user", "write_audit_log"))


class NullSpanExporter(SpanExporter):
    """Counts spans and drops them: the cost measured is the SDK's, never a network's."""

    count = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS


def tracer_provider() -> tuple[TracerProvider, NullSpanExporter]:
    """The global SDK provider (always on, batch processor), set before any instrumentation."""
    exporter, provider = NullSpanExporter(), TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider, exporter


def timed(setup: Callable[..., Callable[[int], None]], *args: t.Any) -> t.Any:
    """A pyperf time function: ``setup(*args)`` runs once in the worker, untimed, and returns
    ``run(loops)``, timed in CPU time of all the worker's threads (see docs/benchmarks.md)."""
    ready: list[Callable[[int], None]] = []

    def time_func(loops: int) -> float:
        if not ready:
            ready.append(setup(*args))
        started = time.process_time()
        ready[0](loops)
        return time.process_time() - started

    return time_func


@dataclass
class Mode:
    """One mode's app, and what it must record per request (checked before timing)."""

    name: str
    app: flask.Flask
    spans: tuple[TracerProvider, NullSpanExporter, int] | None = None  # per request
    samples: dict[str, int] = field(default_factory=dict)  # sample name -> per request
    of: t.AbstractSet[str] = _SIGNUP  # label values the samples are counted for

    def check(self, requests: int) -> None:
        """Raise unless a scrape of ``/metrics`` and the exporter hold what ``requests`` make."""
        want = {name: n * requests for name, n in self.samples.items()}
        got: dict[str, float] = {}
        if self.spans:  # first: a scrape makes a span in the otel modes
            provider, exporter, per_request = self.spans
            provider.force_flush()
            got["spans"], want["spans"] = exporter.count, per_request * requests
        deadline = time.monotonic() + 5  # multiprocess values may be published periodically
        while self.samples:
            text = self.app.test_client().get("/metrics").get_data(as_text=True)
            got.update(count_samples(text, self.samples, self.of))
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if got != want:
            raise RuntimeError(f"{self.name}: recorded {got} after {requests} requests, not {want}")


def count_samples(
    text: str, names: t.Iterable[str], of: t.AbstractSet[str] = _SIGNUP
) -> dict[str, float]:
    """Sum the samples named ``names`` with a label value in ``of`` in a text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in totals and of & set(s.labels.values()):
                totals[s.name] += s.value
    return totals


def signup_app(
    send: Callable[..., t.Any] | None = None,
    wrap: Callable[[Callable[..., None]], Callable[..., None]] = lambda r: r,
    config: dict[str, t.Any] | None = None,
) -> flask.Flask:
    """The signup app; ``send`` and ``wrap`` let the floor add its spans by hand."""
    app = flask.Flask("signup")
    app.config.update(config or {})
    for receiver in RECEIVERS:
        user_signed_up.connect(wrap(receiver), weak=False)  # the floor's wrappers have no owner

    @app.get("/signup/<name>")
    def signup(name: str) -> str:
        sender = flask.current_app._get_current_object()  # type: ignore[attr-defined]
        # Looked up at each call: sigtrace patches Signal.send after the app is made.
        (send or user_signed_up.send)(sender, name=name)
        return f"welcome {name}\n"

    return app


def build(mode: str) -> Mode:
    """Set up ``mode`` (see :data:`MODES`): once per process, since the instrumentations
    patch process-wide state, and before ``prometheus_client`` is imported (it reads
    ``PROMETHEUS_MULTIPROC_DIR`` at import)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
    if mode.endswith("-mp") and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path = tempfile.mkdtemp(prefix="sigtrace-mp-")
        atexit.register(shutil.rmtree, path, True)
    if mode == "floor":
        return _floor()
    spans, tracing = None, mode.startswith(("sigtrace-full", "sigtrace-slow", "sigtrace-none"))
    if tracing or mode.startswith("otel"):  # spans per request: sigtrace-full's five, or one
        spans = (*tracer_provider(), 5 if mode.startswith("sigtrace-full") else 1)
    config: dict[str, t.Any] = {"SIGTRACE_TRACING": tracing}
    if "slow" in mode:  # its receivers do nothing: measured, the path of calls under the
        # threshold, with a threshold (1 s) that a descheduled worker never reaches either
        config.update(SIGTRACE_SPANS="slow", SIGTRACE_SLOW_THRESHOLD=1.0)
    elif "none" in mode:
        config.update(SIGTRACE_SPANS="none")
    app, samples = signup_app(config=config), {}
    if mode.startswith("pfe") or mode == "otel+pfe":
        samples = _PFE
    if mode in ("pfe", "otel+pfe"):
        from prometheus_flask_exporter import PrometheusMetrics  # type: ignore[import-untyped]

        PrometheusMetrics(app, group_by="endpoint")
    elif mode == "pfe-mp":
        from prometheus_flask_exporter.multiprocess import (  # type: ignore[import-untyped]
            GunicornInternalPrometheusMetrics,
        )

        GunicornInternalPrometheusMetrics(app, group_by="endpoint")
    elif mode.startswith("sigtrace"):
        from sigtrace import SigTrace

        SigTrace(app)
        samples = _SIGTRACE
    if mode.startswith("otel"):
        from opentelemetry.instrumentation.flask import FlaskInstrumentor

        FlaskInstrumentor().instrument_app(app)  # type: ignore[no-untyped-call]
    return Mode(mode, app, spans, samples)


def wsgi_app() -> flask.Flask:
    """gunicorn's ``benchmarks.apps:wsgi_app()``: ``BENCH_MODE``, built in each worker."""
    return build(os.environ["BENCH_MODE"]).app


def _floor() -> Mode:
    """The five spans sigtrace makes, with its attributes, each made current, by hand with
    the SDK: what any design making them costs at least. ``attach`` by hand, not
    ``start_as_current_span``, whose context-manager machinery is a cost of its own."""
    from opentelemetry.trace import SpanKind

    provider, exporter = tracer_provider()
    tracer, in_context = provider.get_tracer("floor"), trace.set_span_in_context

    def send(sender: t.Any, **kwargs: t.Any) -> t.Any:
        attributes = {"blinker.signal.name": SIGNAL_NAME, "flask.app.name": sender.name}
        span = tracer.start_span(f"signal {SIGNAL_NAME}", attributes=attributes)
        token = context.attach(in_context(span))
        try:
            return user_signed_up.send(sender, **kwargs)
        finally:
            span.set_attribute("blinker.receivers.called", len(RECEIVERS))
            context.detach(token)
            span.end()

    def wrap(receiver: Callable[..., None]) -> Callable[..., None]:
        name = f"{receiver.__module__}.{receiver.__qualname__}"
        attributes = {"blinker.signal.name": SIGNAL_NAME, "code.function.name": name}

        def traced(sender: t.Any, **kwargs: t.Any) -> None:
            span = tracer.start_span(f"receiver {name}", attributes=attributes)
            token = context.attach(in_context(span))
            try:
                return receiver(sender, **kwargs)
            finally:
                context.detach(token)
                span.end()

        return traced

    app = signup_app(send, wrap)

    @app.before_request
    def start_request_span() -> None:
        request, environ = flask.request, flask.request.environ
        route = request.url_rule.rule if request.url_rule is not None else ""
        host, colon, port = environ.get("HTTP_HOST", "").rpartition(":")
        host, port = (host, port) if colon else (port, "")
        attributes = {  # the required and recommended attributes, as sigtrace sets them
            "http.request.method": request.method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "http.route": route,
            "server.address": host or environ.get("SERVER_NAME", ""),
            "server.port": int(port or environ.get("SERVER_PORT", 0)),
            "client.address": environ.get("REMOTE_ADDR", ""),
            "user_agent.original": environ.get("HTTP_USER_AGENT", ""),
            "network.protocol.version": environ.get("SERVER_PROTOCOL", "HTTP/1.1")[5:],
        }
        span = tracer.start_span(f"{request.method} {route}", None, SpanKind.SERVER, attributes)
        flask.g.floor_span = (span, context.attach(in_context(span)))

    @app.after_request
    def end_request_span(response: flask.Response) -> flask.Response:
        span, token = flask.g.pop("floor_span")
        span.set_attribute("http.response.status_code", response.status_code)
        context.detach(token)
        span.end()
        return response

    return Mode("floor", app, (provider, exporter, 5))
