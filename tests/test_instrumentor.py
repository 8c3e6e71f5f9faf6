"""The zero-code path: the real ``opentelemetry-instrument`` command on an app without sigtrace.

opentelemetry-distro's command loads every ``opentelemetry_instrumentor`` entry
point: opentelemetry-instrumentation-flask makes the server span, sigtrace's
``blinker`` instrumentor the signal and receiver spans under it and the
metrics, pushed over OTLP to the in-repo receiver.
"""

from __future__ import annotations

import sys
import typing as t
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from flask import Flask
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from sigtrace import dispatch
from sigtrace.instrumentor import BlinkerInstrumentor
from tests.app_process import run_module
from tests.conftest import sample
from tests.otlp_receiver import PROTOCOLS, ReceivedPoint, ReceivedSpan, running_receiver
from tests.test_export import ARRIVAL_TIMEOUT, app_env

ROOT = Path(__file__).resolve().parent.parent
COMMAND = Path(sys.executable).parent / "opentelemetry-instrument"
RECEIVERS = {"tests.apps.plain_app.charge_card", "tests.apps.plain_app.reserve_stock"}


@contextmanager
def instrumented_app(env: dict[str, str]) -> Iterator[int]:
    """``opentelemetry-instrument python -m tests.apps.plain_app``; yields its port."""
    assert COMMAND.exists(), "opentelemetry-distro is a dev dependency: pip install -e '.[dev]'"
    with run_module("tests.apps.plain_app", env, wrapper=[str(COMMAND)]) as app:
        yield app.port
    assert "Instrumenting of blinker failed" not in app.stderr, app.stderr


def get(port: int, path: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        response.read()
        return int(response.status)


def instrument_env(receiver_endpoint: str, protocol: str, **more: str) -> dict[str, str]:
    return app_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver_endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_LOGS_EXPORTER="none",
        OTEL_METRIC_EXPORT_INTERVAL="200",
        OTEL_SERVICE_NAME="zero-code-shop",
        **more,
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_opentelemetry_instrument_nests_signal_spans_under_the_flask_server_span(
    protocol: str,
) -> None:
    with (
        running_receiver(protocol) as receiver,
        instrumented_app(instrument_env(receiver.endpoint, protocol)) as port,
    ):
        assert get(port, "/order/o-1") == 200

        def whole_trace(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
            signal = [s for s in spans if s.name == "signal order-placed"]
            if not signal:
                return []
            mine = [s for s in spans if s.trace_id == signal[0].trace_id]
            return mine if len(mine) >= 4 else []

        spans = receiver.wait_for(whole_trace, ARRIVAL_TIMEOUT, "the order's trace")

        def receiver_points(points: list[ReceivedPoint]) -> set[str]:
            names = {
                str(p.attributes.get("receiver"))
                for p in points
                if p.name == "sigtrace.receiver.duration" and p.count > 0
            }
            return names if names >= RECEIVERS else set()

        measured = receiver.wait_for_points(receiver_points, ARRIVAL_TIMEOUT)

    (server,) = [s for s in spans if s.kind == "SERVER"]
    assert server.scope == "opentelemetry.instrumentation.flask"
    assert server.name == "GET /order/<order>"
    (signal,) = [s for s in spans if s.name == "signal order-placed"]
    assert signal.scope == "sigtrace"
    assert signal.parent_span_id == server.span_id
    receivers = [s for s in spans if s.name.startswith("receiver ")]
    assert {s.name.removeprefix("receiver ") for s in receivers} == RECEIVERS
    assert all(s.parent_span_id == signal.span_id for s in receivers)
    assert signal.resource["service.name"] == "zero-code-shop"
    assert measured == RECEIVERS


def test_disabled_by_otel_python_disabled_instrumentations() -> None:
    with running_receiver("grpc") as receiver:
        env = instrument_env(
            receiver.endpoint, "grpc", OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="blinker"
        )
        with instrumented_app(env) as port:
            assert get(port, "/order/o-2") == 200
            receiver.wait_for(
                lambda spans: [s for s in spans if s.kind == "SERVER"], ARRIVAL_TIMEOUT
            )
            # flask's own metrics arriving proves the metrics pipeline runs at all
            receiver.wait_for_points(
                lambda points: [p for p in points if p.name.startswith("http.server.")],
                ARRIVAL_TIMEOUT,
            )
        # the app has exited: every span and metric it would push has been pushed
        assert [s.name for s in receiver.spans if s.scope == "sigtrace"] == []
        assert [p.name for p in receiver.points if p.name.startswith("sigtrace.")] == []
        assert [s.name for s in receiver.spans if s.kind == "SERVER"] == ["GET /order/<order>"]


def test_instrument_and_uninstrument_in_process() -> None:
    registry = CollectorRegistry()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = BlinkerInstrumentor()
    assert list(instrumentor.instrumentation_dependencies()) == ["blinker >= 1.9"]
    from blinker import Namespace, Signal

    original = Signal.send
    instrumentor.instrument(registry=registry, tracer_provider=provider)
    try:
        assert dispatch.is_instrumented()
        app = Flask("in-process")
        ping = Namespace().signal("ping")
        ping.connect(_pong)
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("parent"):
            ping.send(app)
        assert sample(registry, "sigtrace_signal_sends_total", signal="ping") == 1.0
        names = [s.name for s in exporter.get_finished_spans()]
        assert "signal ping" in names and f"receiver {__name__}._pong" in names
    finally:
        instrumentor.uninstrument()
    assert not dispatch.is_instrumented()
    assert Signal.send is original


def _pong(sender: t.Any, **kwargs: t.Any) -> None:
    return None


def test_sigtrace_metrics_port_serves_the_zero_code_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from blinker import Namespace

    monkeypatch.setenv("SIGTRACE_METRICS_PORT", "0")
    monkeypatch.setenv("SIGTRACE_TRACING", "false")
    registry = CollectorRegistry()
    instrumentor = BlinkerInstrumentor()
    instrumentor.instrument(registry=registry)
    try:
        port = instrumentor._metrics_port
        assert port
        Namespace().signal("served").send(None)
        assert get(port, "/metrics") == 200
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert 'sigtrace_signal_sends_total{signal="served"} 1.0' in text
    finally:
        instrumentor.uninstrument()
    with pytest.raises(OSError):
        get(port, "/metrics")  # the server stopped with the instrumentation


def _refuse(sender: t.Any, **kwargs: t.Any) -> None:
    raise PermissionError("refused")


def test_slow_spans_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTRACE_SPANS=slow reaches the instrumentor: a fast receiver leaves no span,
    a failing one is exported with its signal span under the parent."""
    from blinker import Namespace

    monkeypatch.setenv("SIGTRACE_SPANS", "slow")
    monkeypatch.setenv("SIGTRACE_SLOW_THRESHOLD", "0.5")
    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = BlinkerInstrumentor()
    instrumentor.instrument(registry=CollectorRegistry(), tracer_provider=provider)
    try:
        quick, failing = Namespace().signal("quick"), Namespace().signal("failing")
        quick.connect(_pong)
        failing.connect(_refuse)
        with provider.get_tracer("test").start_as_current_span("parent"):
            quick.send(None)
            with pytest.raises(PermissionError):
                failing.send(None)
    finally:
        instrumentor.uninstrument()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == sorted(["parent", "signal failing", f"receiver {__name__}._refuse"])
    refused = spans[f"receiver {__name__}._refuse"]
    assert refused.parent is not None
    assert refused.parent.span_id == spans["signal failing"].context.span_id
