"""OpenTelemetry's conventions: server-span attributes, hooks, OTEL_PYTHON_FLASK_EXCLUDED_URLS,
OTEL_TRACES_EXPORTER. Requests go over real HTTP to a werkzeug server on 127.0.0.1."""

from __future__ import annotations

import http.client
import logging
import threading
import typing as t
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import flask
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from werkzeug.serving import make_server

from sigtrace import SigTrace, dispatch, extension
from sigtrace.config import ConfigError
from tests.app_process import run_module
from tests.conftest import sample
from tests.otlp_receiver import running_receiver
from tests.test_export import ARRIVAL_TIMEOUT, app_env
from tests.test_extension import build_app

pytestmark = pytest.mark.usefixtures("clean_otel_context")


@contextmanager
def served(
    registry: CollectorRegistry, **options: t.Any
) -> Iterator[tuple[str, int, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = build_app()

    @app.route("/shop/cart")
    def cart() -> str:
        return "cart"

    ext = SigTrace(app, registry=registry, tracer_provider=provider, **options)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", server.server_port, exporter
    finally:
        server.shutdown()
        thread.join(timeout=5)
        ext.close()


def fetch(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        response.read()
        return int(response.status)


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]


def test_server_span_has_the_recommended_http_attributes(registry: CollectorRegistry) -> None:
    with served(registry) as (base, port, exporter):
        assert fetch(f"{base}/signup/ada", {"User-Agent": "conventions-test/1.0"}) == 200
        # a Host header naming another host and port, as behind a proxy
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/health", headers={"Host": "shop.example:8443"})
        assert connection.getresponse().status == 200
        connection.close()
    first, second = server_spans(exporter)
    assert {k: first.attributes[k] for k in CONNECTION_KEYS} == {  # type: ignore[index]
        "server.address": "127.0.0.1",
        "server.port": port,
        "client.address": "127.0.0.1",
        "user_agent.original": "conventions-test/1.0",
        "network.protocol.version": "1.1",
    }
    assert second.attributes is not None
    assert (second.attributes["server.address"], second.attributes["server.port"]) == (
        "shop.example",
        8443,
    )
    assert "user_agent.original" not in second.attributes  # http.client sends none


CONNECTION_KEYS = (
    "server.address",
    "server.port",
    "client.address",
    "user_agent.original",
    "network.protocol.version",
)


def test_request_and_response_hooks(registry: CollectorRegistry) -> None:
    seen: list[tuple[str, str]] = []

    def on_request(span: t.Any, request: flask.Request) -> None:
        span.set_attribute("app.tenant", request.headers.get("X-Tenant", ""))
        seen.append(("request", request.path))

    def on_response(span: t.Any, response: flask.Response) -> None:
        span.set_attribute("app.response.length", len(response.get_data()))
        seen.append(("response", str(response.status_code)))

    with served(registry, request_hook=on_request, response_hook=on_response) as (
        base,
        _,
        exporter,
    ):
        assert fetch(f"{base}/signup/ada", {"X-Tenant": "acme"}) == 200
    (span,) = server_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["app.tenant"] == "acme"
    assert span.attributes["app.response.length"] == 2  # "ok"
    assert seen == [("request", "/signup/ada"), ("response", "200")]


def test_a_failing_hook_never_reaches_the_app(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(span: t.Any, thing: t.Any) -> None:
        raise RuntimeError("hook bug")

    monkeypatch.setattr(extension, "_hooks_failed", set())  # "once" starts afresh
    with (
        caplog.at_level(logging.WARNING, logger="sigtrace"),
        served(registry, request_hook=broken, response_hook=broken) as (base, _, exporter),
    ):
        for _ in range(3):
            assert fetch(f"{base}/signup/ada") == 200
    assert len(server_spans(exporter)) == 3  # spans still end, context still detached
    key = "sigtrace_http_request_duration_seconds_count"
    assert sample(registry, key, method="GET", endpoint="signup", status="200") == 3
    messages = [r.getMessage() for r in caplog.records if "hook" in r.getMessage()]
    assert len([m for m in messages if "request_hook" in m]) == 1
    assert len([m for m in messages if "response_hook" in m]) == 1


def test_otel_python_flask_excluded_urls(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_FLASK_EXCLUDED_URLS", "shop/cart,health$")
    with served(registry) as (base, _, exporter):
        assert fetch(f"{base}/shop/cart") == 200
        assert fetch(f"{base}/health") == 200
        assert fetch(f"{base}/signup/ada") == 200
    assert [s.name for s in server_spans(exporter)] == ["GET /signup/<name>"]
    key = "sigtrace_http_request_duration_seconds_count"
    assert sample(registry, key, method="GET", endpoint="cart", status="200") is None
    assert sample(registry, key, method="GET", endpoint="health", status="200") is None
    assert sample(registry, key, method="GET", endpoint="signup", status="200") == 1


def test_the_generic_otel_python_excluded_urls_applies_too(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_EXCLUDED_URLS", "/shop/")
    with served(registry) as (base, _, exporter):
        assert fetch(f"{base}/shop/cart") == 200
        assert fetch(f"{base}/signup/ada") == 200
    assert [s.name for s in server_spans(exporter)] == ["GET /signup/<name>"]


@pytest.mark.parametrize("value", ["zipkin", "otlp,none", "jaeger,console"])
def test_unknown_otel_traces_exporter_is_a_config_error(
    value: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
    with pytest.raises(ConfigError) as caught:
        SigTrace(flask.Flask("bad-exporter"), registry=registry)
    assert "OTEL_TRACES_EXPORTER" in str(caught.value) and repr(value) in str(caught.value)
    assert not dispatch.is_instrumented()


def _signup_traffic(port: int) -> None:
    for user in ("ada", "grace"):
        assert fetch(f"http://127.0.0.1:{port}/signup/{user}") == 200


@pytest.mark.parametrize(
    ("exporter", "to_receiver", "to_stdout"),
    [("console", False, True), ("none", False, False), ("otlp,console", True, True)],
)
def test_otel_traces_exporter_is_honoured(
    exporter: str, to_receiver: bool, to_stdout: bool
) -> None:
    with running_receiver("grpc") as receiver:
        # an endpoint is configured: without OTEL_TRACES_EXPORTER spans would go there
        env = app_env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_TRACES_EXPORTER=exporter)
        with run_module("tests.apps.export_app", env) as app:
            _signup_traffic(app.port)
            if to_receiver:
                receiver.wait_for(
                    lambda spans: [s for s in spans if s.name == "signal user-signed-up"],
                    ARRIVAL_TIMEOUT,
                )
        # the app has exited and flushed: whatever it exports has been exported
        printed = [line for line in app.stdout.splitlines() if line.startswith("[span]")]
        assert bool(printed) is to_stdout, app.stdout
        if to_stdout:
            assert any("'signal user-signed-up'" in line for line in printed)
        assert bool(receiver.spans) is to_receiver
