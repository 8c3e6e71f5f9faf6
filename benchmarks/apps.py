"""The benchmarked app and the instrumentation modes it runs under.

One app for every mode: ``GET /signup/<name>`` sends the custom blinker signal
``user-signed-up`` to three receivers (the demo's signup route, with receivers
that do almost nothing, so that the instrumentation is what is measured).
:func:`build` sets up one mode; call it once per process, since the
instrumentations patch process-wide state, and before anything imports
``prometheus_client`` (it reads ``PROMETHEUS_MULTIPROC_DIR`` at import).
"""

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
import pyperf  # type: ignore[import-untyped]
from blinker import Namespace
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

MODES: dict[str, str] = {
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
}
"""Per-request modes, in table order; ``-mp``: multiprocess metrics."""

SIGNUP_PATH = "/signup/alice"
SIGNAL_NAME = "user-signed-up"
_SIGNUP = frozenset({"signup", SIGNAL_NAME})


def receiver(name: str) -> Callable[..., None]:
    """A receiver that does nothing, named ``name`` (one metric child per name)."""

    def receive(sender: t.Any, **kwargs: t.Any) -> None:
        return None

    receive.__qualname__ = receive.__name__ = name
    return receive


user_signed_up = Namespace().signal(SIGNAL_NAME)
RECEIVERS = tuple(receiver(n) for n in ("send_welcome_email", "count_user", "write_audit_log"))


class NullSpanExporter(SpanExporter):
    """Drops spans after counting them: the cost measured is the SDK's, never a network's."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS


def tracer_provider() -> tuple[TracerProvider, NullSpanExporter]:
    """The global SDK provider (always on, batch processor), set before any instrumentation."""
    exporter = NullSpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider, exporter


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def make_runner(module: str) -> tuple[pyperf.Runner, Callable[[], float]]:
    """pyperf's runner for ``python -m module``, and the clock (``--clock``) its workers use.

    ``cpu``: the process's CPU time, all threads included (the span processor's
    too); a process waiting for a core accrues none, so on a shared machine it
    moves much less with other load than ``wall`` (``perf_counter``) does.
    """
    runner = pyperf.Runner(
        program_args=("-m", module),
        add_cmdline_args=lambda cmd, args: cmd.extend(("--clock", args.clock)),
    )
    runner.argparser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    runner.metadata["clock"] = clock = runner.parse_args().clock
    return runner, CLOCKS[clock]


class Timed:
    """A pyperf time function: ``setup()`` at the first call in a worker, then ``run(loops)``
    timed with ``clock``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock, self.ready = clock, False

    def __call__(self, loops: int) -> float:
        if not self.ready:
            self.setup()
            self.ready = True
        started = self.clock()
        self.run(loops)
        return self.clock() - started

    def setup(self) -> None:
        raise NotImplementedError

    def run(self, n: int) -> None:
        raise NotImplementedError


@dataclass
class Mode:
    """One mode's app, and what it must record per request (checked before timing)."""

    name: str
    app: flask.Flask
    spans: tuple[TracerProvider, NullSpanExporter, int] | None = None  # per request
    samples: dict[str, int] = field(default_factory=dict)  # sample name -> per request
    of: t.AbstractSet[str] = _SIGNUP  # label values the samples are counted for

    def check(self, requests: int) -> None:
        """Raise unless the mode recorded exactly what ``requests`` requests should make.

        Read from a real scrape of the app's ``/metrics`` and from the span
        exporter: a mode that silently recorded nothing would be cheap, and wrong.
        """
        want = {name: per_request * requests for name, per_request in self.samples.items()}
        got: dict[str, float] = {}
        if self.spans:  # first: a scrape makes a span in the otel modes
            provider, exporter, per_request = self.spans
            provider.force_flush()
            got["spans"], want["spans"] = exporter.count, per_request * requests
        deadline = time.monotonic() + 5  # multiprocess values may be published periodically
        while self.samples:
            response = self.app.test_client().get("/metrics")  # a real scrape
            got.update(count_samples(response.get_data(as_text=True), self.samples, self.of))
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if got != want:
            raise RuntimeError(
                f"{self.name}: recorded {got} after {requests} requests, want {want}"
            )


def count_samples(
    text: str, names: t.Iterable[str], of: t.AbstractSet[str] = _SIGNUP
) -> dict[str, float]:
    """Sum the samples named ``names`` with a label value in ``of`` (default: the signup
    endpoint's and the signup signal's) in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in totals and of & set(s.labels.values()):
                totals[s.name] += s.value
    return totals


def create_signup_app(
    send: Callable[..., t.Any] | None = None,
    wrap: Callable[[Callable[..., None]], Callable[..., None]] = lambda r: r,
    config: dict[str, t.Any] | None = None,
) -> flask.Flask:
    """The signup app; ``send`` and ``wrap`` let the floor mode add its spans by hand."""
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


_PFE = {"flask_http_request_duration_seconds_count": 1}
_SIGTRACE = {
    "sigtrace_http_request_duration_seconds_count": 1,
    "sigtrace_receiver_duration_seconds_count": len(RECEIVERS),
}


def build(mode: str) -> Mode:
    """Set up ``mode`` in this process (see :data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
    if mode.endswith("-mp") and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # A fresh directory, removed at exit (the real-server run sets one for all workers).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path = tempfile.mkdtemp(prefix="sigtrace-mp-")
        atexit.register(shutil.rmtree, path, True)
    if mode == "floor":
        return _floor()
    spans = None
    tracing = mode.startswith("sigtrace-full")
    if tracing or mode.startswith("otel"):
        provider, exporter = tracer_provider()
        spans = (provider, exporter, 5 if tracing else 1)
    app = create_signup_app(config={"SIGTRACE_TRACING": tracing})
    samples: dict[str, int] = {}
    if mode in ("pfe", "otel+pfe"):
        from prometheus_flask_exporter import PrometheusMetrics  # type: ignore[import-untyped]

        PrometheusMetrics(app, group_by="endpoint")
        samples = _PFE
    elif mode == "pfe-mp":
        from prometheus_flask_exporter.multiprocess import (  # type: ignore[import-untyped]
            GunicornInternalPrometheusMetrics,
        )

        GunicornInternalPrometheusMetrics(app, group_by="endpoint")
        samples = _PFE
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
    """The five spans sigtrace makes, made by hand with the SDK and nothing else.

    A request SERVER span (before/after_request), the signal span around the
    send and one span per receiver, each made current, with sigtrace's
    attributes: what any design making these spans costs at least.
    """
    from opentelemetry import context
    from opentelemetry.trace import SpanKind

    provider, exporter = tracer_provider()
    tracer = provider.get_tracer("floor")
    # By hand, not start_as_current_span: its context-manager machinery is a cost
    # of that API, not of making the spans, and the floor must not carry it.
    attach, detach, in_context = context.attach, context.detach, trace.set_span_in_context

    def send(sender: t.Any, **kwargs: t.Any) -> t.Any:
        attributes = {"blinker.signal.name": SIGNAL_NAME, "flask.app.name": sender.name}
        span = tracer.start_span(f"signal {SIGNAL_NAME}", attributes=attributes)
        token = attach(in_context(span))
        try:
            return user_signed_up.send(sender, **kwargs)
        finally:
            span.set_attribute("blinker.receivers.called", len(RECEIVERS))
            detach(token)
            span.end()

    def wrap(receiver: Callable[..., None]) -> Callable[..., None]:
        name = f"{receiver.__module__}.{receiver.__qualname__}"
        attributes = {"blinker.signal.name": SIGNAL_NAME, "code.function.name": name}

        def traced(sender: t.Any, **kwargs: t.Any) -> None:
            span = tracer.start_span(f"receiver {name}", attributes=attributes)
            token = attach(in_context(span))
            try:
                return receiver(sender, **kwargs)
            finally:
                detach(token)
                span.end()

        return traced

    app = create_signup_app(send, wrap)

    @app.before_request
    def start_request_span() -> None:
        request = flask.request
        environ = request.environ
        route = request.url_rule.rule if request.url_rule is not None else ""
        host, colon, port = environ.get("HTTP_HOST", "").rpartition(":")
        if not colon:
            host, port = port, ""
        attributes = {
            "http.request.method": request.method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "http.route": route,
            # The server span's recommended attributes, as sigtrace sets them.
            "server.address": host or environ.get("SERVER_NAME", ""),
            "server.port": int(port or environ.get("SERVER_PORT", 0)),
            "client.address": environ.get("REMOTE_ADDR", ""),
            "user_agent.original": environ.get("HTTP_USER_AGENT", ""),
            "network.protocol.version": environ.get("SERVER_PROTOCOL", "HTTP/1.1")[5:],
        }
        span = tracer.start_span(
            f"{request.method} {route}", kind=SpanKind.SERVER, attributes=attributes
        )
        flask.g.floor_span = (span, attach(in_context(span)))

    @app.after_request
    def end_request_span(response: flask.Response) -> flask.Response:
        span, token = flask.g.pop("floor_span")
        span.set_attribute("http.response.status_code", response.status_code)
        detach(token)
        span.end()
        return response

    return Mode("floor", app, (provider, exporter, 5))
