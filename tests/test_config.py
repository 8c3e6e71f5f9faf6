"""Wrong settings are refused where sigtrace reads them, with a message that says
which key, which value and what was expected.

``SIGTRACE_*`` keys raise :class:`sigtrace.ConfigError` at ``init_app``; the
``OTEL_*`` variables sigtrace reads itself get a warning naming the variable
and the value, then the default (as the OpenTelemetry SDK does): spans still
reach a real OTLP receiver.
"""

from __future__ import annotations

import logging

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry

from sigtrace import ConfigError, SigTrace, tracing
from sigtrace.config import check_environment
from tests.otlp_receiver import PROTOCOLS
from tests.test_export import exporting_app, request_trace


def init(registry: CollectorRegistry, **config: object) -> tuple[Flask, SigTrace]:
    app = Flask("config")
    app.config.update(config)
    return app, SigTrace(app, registry=registry)


def assert_refused(registry: CollectorRegistry, setting: str, value: str, expected: str) -> None:
    """``setting=value`` raises a ConfigError that names both and says ``expected``."""
    with pytest.raises(ConfigError) as raised:
        init(registry, **{setting: value})
    message = str(raised.value)
    assert f"{setting}={value!r}" in message
    assert expected in message


@pytest.mark.parametrize("token", ["", " ", "\t\n"])
@pytest.mark.parametrize("source", ["app.config", "the environment"])
def test_an_empty_or_blank_metrics_token_is_refused(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, token: str, source: str
) -> None:
    app = Flask("config")
    if source == "app.config":
        app.config["SIGTRACE_METRICS_TOKEN"] = token
    else:
        monkeypatch.setenv("SIGTRACE_METRICS_TOKEN", token)
    with pytest.raises(ConfigError) as raised:
        SigTrace(app, registry=registry)
    message = str(raised.value)
    assert "SIGTRACE_METRICS_TOKEN" in message and source in message
    assert "non-empty token" in message
    assert "sigtrace" not in app.extensions and "sigtrace_metrics" not in app.view_functions


def test_a_token_with_whitespace_inside_is_refused_without_echoing_it(
    registry: CollectorRegistry,
) -> None:
    with pytest.raises(ConfigError) as raised:
        init(registry, SIGTRACE_METRICS_TOKEN="half of-it")
    assert "half" not in str(raised.value) and "<redacted>" in str(raised.value)


def test_a_set_token_guards_the_route_and_surrounding_whitespace_is_stripped(
    registry: CollectorRegistry,
) -> None:
    app, ext = init(registry, SIGTRACE_METRICS_TOKEN=" t0ken\n")
    try:
        client = app.test_client()
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 401
        ok = client.get("/metrics", headers={"Authorization": "Bearer t0ken"})
        assert ok.status_code == 200 and "sigtrace_signal_sends_total" in ok.text
    finally:
        ext.close()


@pytest.mark.parametrize(
    "endpoint",
    [
        "ftp://x",
        "localhost:4317",
        "127.0.0.1:4317",
        "http://",
        "http://host:99999",
        "grpc://collector:4317",
        "   ",
    ],
)
def test_an_otlp_endpoint_that_is_no_http_url_is_refused(
    registry: CollectorRegistry, endpoint: str
) -> None:
    assert_refused(
        registry, "SIGTRACE_OTLP_ENDPOINT", endpoint, "http:// or https:// URL with a host"
    )


@pytest.mark.parametrize(
    "endpoint", ["http://localhost:4317", "https://collector.example:4318/", "http://[::1]:4317"]
)
def test_http_otlp_endpoints_are_accepted(registry: CollectorRegistry, endpoint: str) -> None:
    app, ext = init(registry, SIGTRACE_OTLP_ENDPOINT=endpoint, SIGTRACE_TRACING=False)
    try:
        assert app.extensions["sigtrace"].settings.otlp_endpoint == endpoint
    finally:
        ext.close()


@pytest.mark.parametrize(
    "path",
    ["/met rics", "metrics", "/metrics?x=1", "/metrics#top", "/<name>", "/a\nb", "/é", "/m%20x"],
)
def test_a_metrics_path_that_is_no_url_path_is_refused(
    registry: CollectorRegistry, path: str
) -> None:
    assert_refused(registry, "SIGTRACE_METRICS_PATH", path, "URL path starting with '/'")


@pytest.mark.parametrize("path", ["/internal/metrics", "/-/metrics.txt", "/a:b@c", ""])
def test_url_paths_are_accepted_and_served(registry: CollectorRegistry, path: str) -> None:
    app, ext = init(registry, SIGTRACE_METRICS_PATH=path)
    try:
        if path:
            assert app.test_client().get(path).status_code == 200
        else:
            assert "sigtrace_metrics" not in app.view_functions
    finally:
        ext.close()


# --------------------------------------------------------------------------
# OTEL_* values: a warning naming the variable and the value, then the default


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "-5"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli"),
    ],
)
def test_a_bad_otel_value_is_named_and_spans_are_still_exported(
    protocol: str, variable: str, value: str
) -> None:
    settings = {"OTEL_EXPORTER_OTLP_PROTOCOL": protocol, variable: value}
    with exporting_app(protocol, **settings) as (receiver, app):
        status, _, spans = request_trace(receiver, app, "frank")
        stderr = app.stderr
    assert status == 200 and "GET /signup/<name>" in spans
    assert f"sigtrace: {variable}={value!r} is invalid: expected" in stderr, stderr
    assert "using the default" in stderr
    assert "Traceback" not in stderr, stderr


def test_an_unknown_otlp_protocol_is_named_and_the_default_grpc_is_used() -> None:
    with exporting_app("grpc", OTEL_EXPORTER_OTLP_PROTOCOL="http/json") as (receiver, app):
        status, _, spans = request_trace(receiver, app, "grace")
        stderr = app.stderr
    assert status == 200 and "GET /signup/<name>" in spans
    assert "sigtrace: OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is invalid" in stderr, stderr
    assert "using the default, 'grpc'" in stderr


def test_a_bad_otel_sdk_disabled_is_named_and_the_sdk_stays_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "yes please")
    with caplog.at_level(logging.WARNING, logger="sigtrace"):
        check_environment()
        assert tracing.sdk_disabled() is False
    assert (
        "OTEL_SDK_DISABLED='yes please' is invalid: expected 'true' or 'false'; "
        "using the default, false"
    ) in caplog.text
    assert caplog.text.count("OTEL_SDK_DISABLED") == 1
    monkeypatch.setenv("OTEL_SDK_DISABLED", " TRUE ")
    assert tracing.sdk_disabled() is True
