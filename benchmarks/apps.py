"""The benchmarked app and the instrumentation modes it runs under.

One app for every mode: ``GET /signup/<name>`` sends the custom blinker signal
``user-signed-up`` with three trivial receivers (the seed's signup route, with
receivers that do almost nothing so that the instrumentation is what is
measured). :func:`build` sets up one mode; call it once per process, since the
instrumentations patch process-wide state.
"""

from __future__ import annotations

import typing as t
from collections.abc import Callable, Sequence

import flask
from blinker import Namespace
from prometheus_client import CollectorRegistry

from . import sdk

__all__ = ["MODES", "ModeState", "build", "create_signup_app", "user_signed_up"]

MODES: tuple[str, ...] = (
    "bare",
    "pfe",
    "otel",
    "otel+pfe",
    "floor",
    "sigtrace-metrics",
    "sigtrace-full",
)
"""Per-request modes, in table order (see the README for what each one is)."""

SIGNUP_PATH = "/signup/alice"
SIGNAL_NAME = "user-signed-up"

_signals = Namespace()
user_signed_up = _signals.signal(SIGNAL_NAME)

_state = {"users": 0, "emails": 0, "audit": 0}


def send_welcome_email(sender: t.Any, **kwargs: t.Any) -> None:
    _state["emails"] += 1


def count_user(sender: t.Any, **kwargs: t.Any) -> None:
    _state["users"] += 1


def write_audit_log(sender: t.Any, **kwargs: t.Any) -> None:
    _state["audit"] += 1


RECEIVERS: tuple[Callable[..., None], ...] = (send_welcome_email, count_user, write_audit_log)

Send = Callable[..., list[tuple[t.Any, t.Any]]]


def create_signup_app(
    *,
    send: Send | None = None,
    wrap_receiver: Callable[[Callable[..., None]], Callable[..., None]] | None = None,
    config: dict[str, t.Any] | None = None,
) -> flask.Flask:
    """The signup app; ``send`` and ``wrap_receiver`` let the floor mode add spans by hand."""
    app = flask.Flask("signup")
    app.config.update(config or {})
    for receiver in RECEIVERS:
        # weak=False: the floor mode's wrappers have no other owner.
        user_signed_up.connect(wrap_receiver(receiver) if wrap_receiver else receiver, weak=False)

    @app.get("/signup/<name>")
    def signup(name: str) -> str:
        sender = flask.current_app._get_current_object()  # type: ignore[attr-defined]
        if send is None:
            # Looked up at each call, never bound early: sigtrace patches Signal.send later.
            user_signed_up.send(sender, name=name)
        else:
            send(sender, name=name)
        return f"welcome {name}\n"

    return app


class ModeState:
    """One mode's app and what it records (for the sanity columns of the tables)."""

    def __init__(
        self,
        mode: str,
        app: flask.Flask,
        spans: sdk.NullSpanExporter | None = None,
        provider: t.Any = None,
        registry: CollectorRegistry | None = None,
        request_samples: Sequence[str] = (),
    ) -> None:
        self.mode = mode
        self.app = app
        self.spans = spans
        self.provider = provider
        self.registry = registry
        self.request_samples = tuple(request_samples)

    def spans_exported(self) -> int | None:
        """Spans that reached the exporter so far (after a flush), or None without tracing."""
        if self.spans is None:
            return None
        self.provider.force_flush()
        return self.spans.count

    def requests_recorded(self) -> int | None:
        """Requests the mode's Prometheus metrics counted, or None without them."""
        return self._count(self.request_samples)

    def receivers_recorded(self) -> int | None:
        """Receiver calls sigtrace's metrics counted, or None for other modes."""
        if not self.mode.startswith("sigtrace"):
            return None
        return self._count(("sigtrace_receiver_duration_seconds_count",))

    def _count(self, names: Sequence[str]) -> int | None:
        if self.registry is None:
            return None
        total = 0.0
        for family in self.registry.collect():
            for s in family.samples:
                if s.name in names:
                    total += s.value
        return int(total)


def _pfe(app: flask.Flask) -> CollectorRegistry:
    from prometheus_flask_exporter import PrometheusMetrics  # type: ignore[import-untyped]

    registry = CollectorRegistry()
    PrometheusMetrics(app, group_by="endpoint", registry=registry)
    return registry


def _otel(app: flask.Flask, provider: t.Any) -> None:
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    FlaskInstrumentor().instrument_app(  # type: ignore[no-untyped-call]
        app, tracer_provider=provider, meter_provider=sdk.meter_provider()
    )


def build(mode: str) -> ModeState:
    """Set up ``mode`` in this process and return its app."""
    if mode == "bare":
        return ModeState(mode, create_signup_app())
    if mode == "pfe":
        app = create_signup_app()
        return ModeState(mode, app, registry=_pfe(app), request_samples=_PFE_SAMPLES)
    if mode in ("otel", "otel+pfe"):
        provider, spans = sdk.tracer_provider(set_global=True)
        app = create_signup_app()
        registry = _pfe(app) if mode == "otel+pfe" else None
        _otel(app, provider)
        return ModeState(mode, app, spans, provider, registry, _PFE_SAMPLES)
    if mode == "floor":
        return _floor()
    if mode == "sigtrace-metrics":
        return _sigtrace(mode, tracing=False)
    if mode == "sigtrace-full":
        return _sigtrace(mode, tracing=True)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


_PFE_SAMPLES = ("flask_http_request_duration_seconds_count",)
_SIGTRACE_SAMPLES = ("sigtrace_http_request_duration_seconds_count",)


def _sigtrace(mode: str, *, tracing: bool) -> ModeState:
    from sigtrace import SigTrace

    provider = spans = None
    if tracing:
        # The global provider is set before SigTrace(app), as an app would.
        provider, spans = sdk.tracer_provider(set_global=True)
    app = create_signup_app(config={"SIGTRACE_TRACING": tracing, "SIGTRACE_METRICS": True})
    registry = CollectorRegistry()
    SigTrace(app, registry=registry)
    return ModeState(mode, app, spans, provider, registry, _SIGTRACE_SAMPLES)


def _floor() -> ModeState:
    """The five spans sigtrace makes, made by hand with the SDK and nothing else.

    Request SERVER span (before_request / after_request), the signal span around
    the send and one span per receiver, each started and made current, with the
    same attributes sigtrace sets. What sigtrace-full costs beyond this is
    sigtrace's own overhead (plus its metrics).
    """
    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind

    provider, spans = sdk.tracer_provider(set_global=True)
    tracer = provider.get_tracer("floor")
    attach, detach = context.attach, context.detach
    in_context = trace.set_span_in_context
    signal_attributes = {"blinker.signal.name": SIGNAL_NAME}

    def send(sender: t.Any, **kwargs: t.Any) -> list[tuple[t.Any, t.Any]]:
        span = tracer.start_span(
            f"signal {SIGNAL_NAME}",
            attributes={**signal_attributes, "flask.app.name": sender.name},
        )
        token = attach(in_context(span))
        try:
            return user_signed_up.send(sender, **kwargs)
        finally:
            span.set_attribute("blinker.receivers.count", len(RECEIVERS))
            detach(token)
            span.end()

    def wrap_receiver(receiver: Callable[..., None]) -> Callable[..., None]:
        name = f"{receiver.__module__}.{receiver.__qualname__}"
        span_name = f"receiver {name}"
        attributes = {"blinker.signal.name": SIGNAL_NAME, "code.function.name": name}

        def traced(sender: t.Any, **kwargs: t.Any) -> None:
            span = tracer.start_span(span_name, attributes=attributes)
            token = attach(in_context(span))
            try:
                return receiver(sender, **kwargs)
            finally:
                detach(token)
                span.end()

        return traced

    app = create_signup_app(send=send, wrap_receiver=wrap_receiver)

    @app.before_request
    def start_request_span() -> None:
        request = flask.request
        rule = request.url_rule
        route = rule.rule if rule is not None else ""
        span = tracer.start_span(
            f"{request.method} {route}",
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "url.path": request.path,
                "url.scheme": request.scheme,
                "http.route": route,
            },
        )
        flask.g.floor_span = (span, attach(in_context(span)))

    @app.after_request
    def end_request_span(response: flask.Response) -> flask.Response:
        span, token = flask.g.pop("floor_span")
        span.set_attribute("http.response.status_code", response.status_code)
        detach(token)
        span.end()
        return response

    return ModeState("floor", app, spans, provider)
