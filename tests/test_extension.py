"""SigTrace(app): request timing, exceptions, spans, config, several apps."""

from __future__ import annotations

import contextvars
import logging
import threading
import typing as t
import urllib.error
import urllib.request
from collections.abc import Iterator

import blinker
import flask
import pytest
from flask import signals as flask_signals
from opentelemetry import trace
from opentelemetry.context import Context, get_current
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from werkzeug.serving import make_server

from sigtrace import ConfigError, SigTrace, dispatch, extension, tracing
from sigtrace.config import KEYS
from sigtrace.extension import UNMATCHED_ENDPOINT
from tests.conftest import sample, samples_from_text, series

NS = blinker.Namespace()
signed_up = NS.signal("ext-user-signed-up")

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def send_welcome_email(sender: object, **kwargs: object) -> None:
    return None


def update_count(sender: object, **kwargs: object) -> None:
    return None


def write_audit_log(sender: object, user: str = "", **kwargs: object) -> None:
    if user == "mallory":
        raise PermissionError("audit refused")


for _receiver in (send_welcome_email, update_count, write_audit_log):
    signed_up.connect(_receiver)


class Traced(t.NamedTuple):
    app: flask.Flask
    registry: CollectorRegistry
    spans: InMemorySpanExporter
    ext: SigTrace


def build_app(**config: t.Any) -> flask.Flask:
    app = flask.Flask("ext-test")
    app.config.update(config)

    @app.route("/signup/<name>", methods=["GET", "POST"])
    def signup(name: str) -> str:
        signed_up.send(flask.current_app._get_current_object(), user=name)  # type: ignore[attr-defined]
        return "ok"

    @app.route("/boom")
    def boom() -> str:
        raise LookupError("broken view")

    @app.route("/stream")
    def stream() -> flask.Response:
        def body() -> Iterator[str]:
            yield "a"
            yield "b"

        return flask.Response(body())

    @app.route("/async/<name>")
    async def async_view(name: str) -> str:
        signed_up.send(flask.current_app._get_current_object(), user=name)  # type: ignore[attr-defined]
        return "ok"

    @app.route("/health")
    def health() -> str:
        return "ok"

    return app


@pytest.fixture
def traced(registry: CollectorRegistry) -> Iterator[t.Callable[..., Traced]]:
    made: list[SigTrace] = []

    def make(**config: t.Any) -> Traced:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        app = build_app(**config)
        ext = SigTrace(app, registry=registry, tracer_provider=provider)
        made.append(ext)
        return Traced(app, registry, exporter, ext)

    yield make
    for ext in made:
        ext.close()


def by_name(spans: t.Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_requests_counted_by_endpoint_method_and_status(traced: t.Callable[..., Traced]) -> None:
    app, registry, _, _ = traced()
    client = app.test_client()
    for _ in range(3):
        assert client.get("/signup/ada").status_code == 200
    assert client.post("/signup/bob").status_code == 200
    assert client.get("/boom").status_code == 500
    key = "sigtrace_http_request_duration_seconds_count"
    assert sample(registry, key, method="GET", endpoint="signup", status="200") == 3
    assert sample(registry, key, method="POST", endpoint="signup", status="200") == 1
    assert sample(registry, key, method="GET", endpoint="boom", status="500") == 1
    assert (
        sample(
            registry,
            "sigtrace_http_request_exceptions_total",
            method="GET",
            endpoint="boom",
            exception="LookupError",
        )
        == 1
    )


def test_unmatched_urls_fold_into_one_endpoint(traced: t.Callable[..., Traced]) -> None:
    app, registry, _, _ = traced()
    client = app.test_client()
    for path in ("/a", "/b/c", "/d?x=1"):
        assert client.get(path).status_code == 404
    assert client.delete("/health").status_code == 405
    endpoints = {
        lb["endpoint"] for lb in series(registry, "sigtrace_http_request_duration_seconds_count")
    }
    assert "/a" not in endpoints and "/b/c" not in endpoints
    key = "sigtrace_http_request_duration_seconds_count"
    assert sample(registry, key, method="GET", endpoint=UNMATCHED_ENDPOINT, status="404") == 3
    assert sample(registry, key, method="DELETE", endpoint=UNMATCHED_ENDPOINT, status="405") == 1


def test_unknown_methods_fold_into_other(traced: t.Callable[..., Traced]) -> None:
    app, registry, _, _ = traced()
    app.test_client().open("/health", method="BREW")
    methods = {
        lb["method"] for lb in series(registry, "sigtrace_http_request_duration_seconds_count")
    }
    assert methods == {"_OTHER"}


def test_testing_mode_fallback_records_the_request_exactly_once(
    traced: t.Callable[..., Traced],
) -> None:
    app, registry, spans, _ = traced()
    app.testing = True  # PROPAGATE_EXCEPTIONS: request_finished is never sent
    client = app.test_client()
    with pytest.raises(LookupError):
        client.get("/boom")
    key = "sigtrace_http_request_duration_seconds_count"
    assert sample(registry, key, method="GET", endpoint="boom", status="500") == 1
    assert len(series(registry, key)) == 1
    server = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert len(server) == 1
    assert server[0].status.status_code is StatusCode.ERROR
    assert trace.get_current_span() is trace.INVALID_SPAN, "request context leaked"


def test_span_tree_request_signal_receivers_under_propagated_parent(
    traced: t.Callable[..., Traced],
) -> None:
    app, _, spans, _ = traced()
    response = app.test_client().get(
        "/signup/ada", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    )
    assert response.status_code == 200
    finished = spans.get_finished_spans()
    (request_span,) = by_name(finished, "GET /signup/<name>")
    (signal_span,) = by_name(finished, "signal ext-user-signed-up")
    receivers = [s for s in finished if s.name.startswith("receiver ")]
    assert request_span.kind is SpanKind.SERVER
    assert request_span.parent is not None and request_span.parent.is_remote
    assert format(request_span.parent.span_id, "016x") == PARENT_ID
    assert {format(s.context.trace_id, "032x") for s in finished} == {TRACE_ID}
    assert signal_span.parent is not None
    assert signal_span.parent.span_id == request_span.context.span_id
    assert {s.parent.span_id for s in receivers if s.parent} == {signal_span.context.span_id}
    assert sorted(s.attributes["code.function.name"] for s in receivers) == sorted(  # type: ignore[index]
        f"{__name__}.{f}" for f in ("send_welcome_email", "update_count", "write_audit_log")
    )
    attrs = dict(request_span.attributes or {})
    assert attrs["http.request.method"] == "GET"
    assert attrs["http.route"] == "/signup/<name>"
    assert attrs["url.path"] == "/signup/ada"
    assert attrs["url.scheme"] == "http"
    assert attrs["http.response.status_code"] == 200
    assert dict(signal_span.attributes or {})["flask.app.name"] == "ext-test"


def test_failing_receiver_marks_spans_and_counts_the_request_exception(
    traced: t.Callable[..., Traced],
) -> None:
    app, registry, spans, _ = traced()
    assert app.test_client().get("/signup/mallory").status_code == 500
    finished = spans.get_finished_spans()
    (failed,) = by_name(finished, f"receiver {__name__}.write_audit_log")
    assert failed.status.status_code is StatusCode.ERROR
    assert dict(failed.attributes or {})["error.type"] == "PermissionError"
    assert [e.name for e in failed.events] == ["exception"]
    (request_span,) = [s for s in finished if s.kind is SpanKind.SERVER]
    assert request_span.status.status_code is StatusCode.ERROR
    assert dict(request_span.attributes or {})["error.type"] == "PermissionError"
    assert (
        sample(
            registry,
            "sigtrace_http_request_exceptions_total",
            method="GET",
            endpoint="signup",
            exception="PermissionError",
        )
        == 1
    )


def test_streamed_response_ends_the_span_once_and_detaches(
    traced: t.Callable[..., Traced],
) -> None:
    app, registry, spans, _ = traced()
    response = app.test_client().get("/stream")
    assert response.data == b"ab"
    server = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert len(server) == 1
    key = "sigtrace_http_request_duration_seconds_count"
    assert sample(registry, key, method="GET", endpoint="stream", status="200") == 1
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_async_view_is_timed_and_traced(traced: t.Callable[..., Traced]) -> None:
    app, registry, spans, _ = traced()
    assert app.test_client().get("/async/ada").status_code == 200
    key = "sigtrace_http_request_duration_seconds_count"
    assert sample(registry, key, method="GET", endpoint="async_view", status="200") == 1
    (signal_span,) = by_name(spans.get_finished_spans(), "signal ext-user-signed-up")
    (request_span,) = by_name(spans.get_finished_spans(), "GET /async/<name>")
    assert signal_span.parent is not None
    assert signal_span.parent.span_id == request_span.context.span_id


def test_metrics_path_is_excluded_and_served(traced: t.Callable[..., Traced]) -> None:
    app, registry, _, _ = traced()
    client = app.test_client()
    client.get("/signup/ada")
    body = client.get("/metrics")
    assert body.status_code == 200
    assert body.content_type.startswith("text/plain")
    parsed = samples_from_text(body.data.decode())
    key = ("sigtrace_http_request_duration_seconds_count",
           (("endpoint", "signup"), ("method", "GET"), ("status", "200")))  # fmt: skip
    assert parsed[key] == 1
    endpoints = {
        lb["endpoint"] for lb in series(registry, "sigtrace_http_request_duration_seconds_count")
    }
    assert "sigtrace_metrics" not in endpoints


def test_excluded_paths_are_not_timed(traced: t.Callable[..., Traced]) -> None:
    app, registry, spans, _ = traced(SIGTRACE_EXCLUDED_PATHS="/health,/static/*")
    app.test_client().get("/health")
    assert series(registry, "sigtrace_http_request_duration_seconds_count") == []
    assert [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER] == []


def test_sigtrace_hooks_are_not_user_receivers(traced: t.Callable[..., Traced]) -> None:
    app, registry, _, _ = traced()
    app.test_client().get("/signup/ada")
    for sig in (
        flask_signals.request_started,
        flask_signals.request_finished,
        flask_signals.got_request_exception,
        flask_signals.request_tearing_down,
    ):
        assert not sig.receivers, f"{sig.name} has sigtrace receivers"
    receivers = {
        lb["receiver"] for lb in series(registry, "sigtrace_receiver_duration_seconds_count")
    }
    assert not any(r.startswith("sigtrace.") for r in receivers)


def test_user_receivers_on_flask_signals_are_measured(traced: t.Callable[..., Traced]) -> None:
    app, registry, spans, _ = traced()
    seen: list[int] = []

    def on_finished(sender: flask.Flask, response: flask.Response, **kw: object) -> None:
        seen.append(response.status_code)

    with flask_signals.request_finished.connected_to(on_finished, app):
        app.test_client().get("/health")
    assert seen == [200]
    name = f"{__name__}.test_user_receivers_on_flask_signals_are_measured.<locals>.on_finished"
    assert (
        sample(
            registry,
            "sigtrace_receiver_duration_seconds_count",
            signal="request-finished",
            receiver=name,
        )
        == 1
    )
    (request_span,) = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    (finished_span,) = by_name(spans.get_finished_spans(), "signal request-finished")
    assert finished_span.parent is not None
    assert finished_span.parent.span_id == request_span.context.span_id


def test_every_request_signal_runs_under_the_request_span(
    traced: t.Callable[..., Traced],
) -> None:
    """Request timing wraps Flask's handling (the app's WSGI call, Flask's hooks): the
    request span is current for the receivers of every request signal, first to last."""
    app, _, spans, _ = traced()
    current: dict[str, trace.Span] = {}
    flask_request_signals = (
        flask_signals.request_started,
        flask_signals.request_finished,
        flask_signals.request_tearing_down,
    )

    def on_signal(name: str) -> t.Callable[..., None]:
        def receive(sender: object, **kw: object) -> None:
            current[name] = trace.get_current_span()

        return receive

    receivers = {sig.name: on_signal(sig.name) for sig in flask_request_signals}
    for sig in flask_request_signals:
        sig.connect(receivers[sig.name], app)
    try:
        assert app.test_client().get("/signup/ada").status_code == 200
    finally:
        for sig in flask_request_signals:
            sig.disconnect(receivers[sig.name], app)
    (request_span,) = by_name(spans.get_finished_spans(), "GET /signup/<name>")
    for sig in flask_request_signals:
        (signal_span,) = by_name(spans.get_finished_spans(), f"signal {sig.name}")
        assert signal_span.parent is not None, sig.name
        assert signal_span.parent.span_id == request_span.context.span_id, sig.name
        assert current[sig.name].get_span_context().trace_id == request_span.context.trace_id
    assert sorted(current) == sorted(sig.name for sig in flask_request_signals)


def test_a_request_signal_sent_by_hand_records_no_request(
    traced: t.Callable[..., Traced], caplog: pytest.LogCaptureFixture
) -> None:
    """No request code runs inside a send: Flask's request signals sent outside a
    request are sends like any other (no request recorded, no sigtrace fault)."""
    app, registry, spans, _ = traced()
    caplog.set_level("DEBUG", logger="sigtrace")
    flask_signals.request_started.send(app)
    flask_signals.request_finished.send(app, response=flask.Response("x"))
    assert series(registry, "sigtrace_http_request_duration_seconds_count") == []
    assert sample(registry, "sigtrace_signal_sends_total", signal="request-started") == 1
    assert [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER] == []
    assert [r.getMessage() for r in caplog.records if r.name == "sigtrace"] == []


def test_nests_under_opentelemetry_instrumentation_flask(registry: CollectorRegistry) -> None:
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = build_app()
    FlaskInstrumentor().instrument_app(app, tracer_provider=provider)
    ext = SigTrace(app, registry=registry, tracer_provider=provider)
    try:
        assert app.test_client().get("/signup/ada").status_code == 200
    finally:
        ext.close()
        FlaskInstrumentor().uninstrument_app(app)
    finished = exporter.get_finished_spans()
    server = [s for s in finished if s.kind is SpanKind.SERVER]
    assert len(server) == 1, "sigtrace made a second server span"
    assert server[0].instrumentation_scope is not None
    assert server[0].instrumentation_scope.name == "opentelemetry.instrumentation.flask"
    (signal_span,) = by_name(finished, "signal ext-user-signed-up")
    assert signal_span.parent is not None
    assert signal_span.parent.span_id == server[0].context.span_id
    key = "sigtrace_http_request_duration_seconds_count"
    assert sample(registry, key, method="GET", endpoint="signup", status="200") == 1


def test_nests_under_an_active_span(traced: t.Callable[..., Traced]) -> None:
    app, _, spans, ext = traced()
    assert ext.tracer_provider is not None
    tracer = ext.tracer_provider.get_tracer("outer")
    with tracer.start_as_current_span("outer") as outer:
        app.test_client().get("/signup/ada")
    finished = spans.get_finished_spans()
    assert [s for s in finished if s.kind is SpanKind.SERVER] == []
    (signal_span,) = by_name(finished, "signal ext-user-signed-up")
    assert signal_span.parent is not None
    assert signal_span.parent.span_id == outer.get_span_context().span_id


def test_init_app_factory_pattern_and_several_apps(registry: CollectorRegistry) -> None:
    ext = SigTrace(registry=registry)
    apps = [build_app(), build_app()]
    try:
        for app in apps:
            ext.init_app(app)
            assert app.extensions["sigtrace"].ext is ext
        for app in apps:
            app.test_client().get("/signup/ada")
    finally:
        ext.close()
    key = "sigtrace_http_request_duration_seconds_count"
    assert sample(registry, key, method="GET", endpoint="signup", status="200") == 2
    assert not dispatch.is_instrumented()


def test_init_twice_on_one_app_is_refused(traced: t.Callable[..., Traced]) -> None:
    app, _, _, ext = traced()
    with pytest.raises(ConfigError, match="already initialised"):
        ext.init_app(app)


def test_real_http_server_counts_every_request(traced: t.Callable[..., Traced]) -> None:
    app, _, _, _ = traced()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        for i in range(20):
            with urllib.request.urlopen(f"{base}/signup/u{i}", timeout=5) as response:
                assert response.status == 200
        for _ in range(2):
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(f"{base}/boom", timeout=5)
            assert error.value.code == 500
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        thread.join(timeout=5)
    parsed = samples_from_text(text)
    assert parsed[(
        "sigtrace_http_request_duration_seconds_count",
        (("endpoint", "signup"), ("method", "GET"), ("status", "200")),
    )] == 20  # fmt: skip
    assert parsed[(
        "sigtrace_http_request_exceptions_total",
        (("endpoint", "boom"), ("exception", "LookupError"), ("method", "GET")),
    )] == 2  # fmt: skip
    assert parsed[("sigtrace_signal_sends_total", (("signal", "ext-user-signed-up"),))] == 20


BAD_VALUES: dict[str, object] = {
    "SIGTRACE_METRICS": "maybe",
    "SIGTRACE_TRACING": 3,
    "SIGTRACE_METRICS_PATH": "metrics",
    "SIGTRACE_METRICS_PORT": 70000,
    "SIGTRACE_METRICS_ADDR": "",
    "SIGTRACE_METRICS_TOKEN": 12345,
    "SIGTRACE_SPANS": "some",
    "SIGTRACE_ROOT_SPANS": "sometimes",
    "SIGTRACE_INCLUDE_SIGNALS": 5,
    "SIGTRACE_EXCLUDE_SIGNALS": [1, 2],
    "SIGTRACE_EXCLUDED_PATHS": {"a": 1},
    "SIGTRACE_RECORD_KWARGS": 1.5,
    "SIGTRACE_BUCKETS": [0.1, 0.05],
    "SIGTRACE_MAX_LABEL_VALUES": 0,
    "SIGTRACE_OTLP_ENDPOINT": 8,
    "SIGTRACE_CONSOLE_SPANS": "loud",
    "SIGTRACE_PUBLISH_INTERVAL": 0,
    "SIGTRACE_MULTIPROC_ALLOW_SHARED_DIR": "perhaps",
    "SIGTRACE_SLOW_THRESHOLD": -1,
    "SIGTRACE_UI": "perhaps",
    "SIGTRACE_UI_PATH": "/",
    "SIGTRACE_TRACE_URL": "http://jaeger.example/trace/",
}


def test_every_key_has_a_bad_value_case() -> None:
    assert set(BAD_VALUES) == set(KEYS)


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_bad_config_value_raises_config_error_naming_key_and_value(
    registry: CollectorRegistry, key: str
) -> None:
    app = build_app(**{key: BAD_VALUES[key]})
    with pytest.raises(ConfigError) as caught:
        SigTrace(app, registry=registry)
    message = str(caught.value)
    assert key in message
    if key == "SIGTRACE_METRICS_TOKEN":  # a secret is never echoed
        assert repr(BAD_VALUES[key]) not in message and "<redacted>" in message
    else:
        assert repr(BAD_VALUES[key]) in message
    assert "expected" in message
    assert isinstance(caught.value, ValueError)
    assert not dispatch.is_instrumented()


def test_bad_environment_value_names_the_environment(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGTRACE_MAX_LABEL_VALUES", "lots")
    with pytest.raises(
        ConfigError, match=r"SIGTRACE_MAX_LABEL_VALUES='lots' \(from the environment\)"
    ):
        SigTrace(build_app(), registry=registry)


def test_unknown_key_is_refused_with_a_suggestion(registry: CollectorRegistry) -> None:
    with pytest.raises(ConfigError, match="did you mean SIGTRACE_METRICS_PATH"):
        SigTrace(build_app(SIGTRACE_METRIC_PATH="/m"), registry=registry)


def test_environment_values_are_read(
    traced: t.Callable[..., Traced], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGTRACE_METRICS_PATH", "/internal/metrics")
    app, _, _, _ = traced()
    client = app.test_client()
    assert client.get("/internal/metrics").status_code == 200
    assert client.get("/metrics").status_code == 404


def comparable(context: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """A context's entries, spans by their SpanContext (spans compare by identity)."""
    return {k: v.get_span_context() if isinstance(v, trace.Span) else v for k, v in context.items()}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"HTTP_TRACEPARENT": f"00-{'ab' * 16}-{'cd' * 8}-01"},
        {"HTTP_TRACEPARENT": ""},
        {"HTTP_BAGGAGE": "user=alice"},
        {"HTTP_TRACESTATE": "k=v"},  # without a traceparent: nothing to extract
    ],
    ids=["none", "traceparent", "empty-traceparent", "baggage", "tracestate-only"],
)
@pytest.mark.parametrize("order", ["tracecontext,baggage", "baggage,tracecontext", "tracecontext"])
def test_the_parent_context_is_what_the_propagators_extract(
    headers: dict[str, str], order: str, monkeypatch: pytest.MonkeyPatch, clean_otel_context: None
) -> None:
    """The request's parent context, read without the propagators when they would find
    nothing, is what ``propagate.extract`` returns, whichever propagators are set."""
    from opentelemetry import baggage, propagate
    from opentelemetry import context as otel_context
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    chosen = {"tracecontext": TraceContextTextMapPropagator(), "baggage": W3CBaggagePropagator()}
    monkeypatch.setattr(
        propagate, "_HTTP_TEXT_FORMAT", CompositePropagator([chosen[n] for n in order.split(",")])
    )
    calls: list[object] = []

    def extract(*args: t.Any, **kwargs: t.Any) -> t.Any:
        calls.append(args)
        return propagate.extract(*args, **kwargs)

    state = t.cast(t.Any, type("State", (), {}))()
    state.extract, state.textmap = extract, propagate.get_global_textmap
    environ = {"REQUEST_METHOD": "GET", "HTTP_HOST": "example", **headers}
    token = otel_context.attach(baggage.set_baggage("outer", "1"))  # what a bad order keeps
    try:
        found = extension._parent_context(state, environ)
        expected = propagate.extract(environ, getter=extension._ENVIRON_GETTER)
        assert comparable(found) == comparable(expected)
    finally:
        otel_context.detach(token)
    skipped = order == "tracecontext,baggage" and not {"HTTP_TRACEPARENT", "HTTP_BAGGAGE"} & set(
        headers
    )
    assert bool(calls) is not skipped


def test_a_request_context_token_from_another_context_still_ends_the_span(
    traced: t.Callable[..., Traced], caplog: pytest.LogCaptureFixture
) -> None:
    """The request's context is reset straight through OpenTelemetry's ContextVar; a token
    it cannot reset (made in another context) goes to ``opentelemetry.context.detach``,
    which logs it, and the span still ends, is exported and the request is counted."""
    t_ = traced()
    state = t_.app.extensions["sigtrace"]
    record = extension._Request(state, "GET")
    record.span = state.tracer.start_span("GET", kind=SpanKind.SERVER)
    record.token = contextvars.copy_context().run(tracing.attach, Context({"other": 1}))
    before = get_current()
    with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
        record.finish()  # raises nothing
    assert get_current() == before
    assert [s.name for s in t_.spans.get_finished_spans()] == ["GET"]
    assert "Failed to detach context" in caplog.text
    key = "sigtrace_http_request_duration_seconds_count"
    assert sample(t_.registry, key, method="GET", endpoint=UNMATCHED_ENDPOINT, status="500") == 1
