"""Wrong settings are refused where sigtrace reads them, with a message that says
which key, which value and what was expected.

``SIGTRACE_*`` keys raise :class:`sigtrace.ConfigError` at ``init_app``; the
``OTEL_*`` variables sigtrace reads itself get a warning naming the variable
and the value, then the default (as the OpenTelemetry SDK does): spans still
reach a real OTLP receiver.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from sigtrace import ConfigError, SigTrace, dispatch, gunicorn, tracing
from sigtrace.config import check_environment, check_exposure, load_settings
from tests.otlp_receiver import PROTOCOLS, free_port
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


def test_the_issue_s_sdk_values_warn_and_spans_still_reach_a_real_receiver() -> None:
    """Values the SDK would raise on (after blinker was patched) are named once each,
    replaced by their defaults, and the app starts and exports."""
    bad = {
        "OTEL_BSP_MAX_QUEUE_SIZE": "-5",
        "OTEL_BSP_SCHEDULE_DELAY": "soon",
        "OTEL_SPAN_EVENT_COUNT_LIMIT": "-3",
        "OTEL_PYTHON_FLASK_EXCLUDED_URLS": "[",
        "OTEL_EXPORTER_OTLP_INSECURE": "maybe",
    }
    with exporting_app("grpc", **bad) as (receiver, app):
        status, _, spans = request_trace(receiver, app, "heidi")
        stderr = app.stderr
    assert status == 200 and "GET /signup/<name>" in spans
    for variable, value in bad.items():
        assert stderr.count(f"sigtrace: {variable}={value!r}") == 1, (variable, stderr)
    assert "using the default, 2048" in stderr
    assert "Traceback" not in stderr, stderr


# --------------------------------------------------------------------------
# When nothing samples, one INFO line says so


@pytest.fixture
def no_otel(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith(("OTEL_", "SIGTRACE_")):
            monkeypatch.delenv(key)
    assert not tracing.user_configured_provider()
    return monkeypatch


@pytest.mark.parametrize(
    ("environ", "reason", "fix"),
    [
        ({}, "no OTLP endpoint and no TracerProvider", "set OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"SIGTRACE_TRACING": "false"}, "SIGTRACE_TRACING is false", "SIGTRACE_TRACING=true"),
        ({"OTEL_TRACES_EXPORTER": "none"}, "OTEL_TRACES_EXPORTER=none", "unset"),
        ({"OTEL_SDK_DISABLED": "true"}, "OTEL_SDK_DISABLED=true", "unset OTEL_SDK_DISABLED"),
    ],
)
def test_one_info_line_says_why_nothing_samples_and_how_to_turn_it_on(
    registry: CollectorRegistry,
    no_otel: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    environ: dict[str, str],
    reason: str,
    fix: str,
) -> None:
    for key, value in environ.items():
        no_otel.setenv(key, value)
    with caplog.at_level(logging.INFO, logger="sigtrace"):
        ext = SigTrace(Flask("unsampled"), registry=registry)
    ext.close()
    lines = [r for r in caplog.records if "no spans and no exemplars" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert lines[0].levelno == logging.INFO
    assert reason in lines[0].getMessage() and fix in lines[0].getMessage()


def test_no_such_line_with_a_provider(
    registry: CollectorRegistry, no_otel: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="sigtrace"):
        ext = SigTrace(Flask("sampled"), registry=registry, tracer_provider=TracerProvider())
    ext.close()
    assert "no spans and no exemplars" not in caplog.text


# --------------------------------------------------------------------------
# The separate server: exposure, bind errors, and the gunicorn master


@pytest.mark.parametrize(
    ("config", "auth", "warned"),
    [
        ({"SIGTRACE_METRICS_ADDR": "0.0.0.0"}, False, True),
        ({"SIGTRACE_METRICS_ADDR": "metrics.internal"}, False, True),
        ({"SIGTRACE_METRICS_ADDR": "0.0.0.0", "SIGTRACE_METRICS_TOKEN": "t"}, False, False),
        ({"SIGTRACE_METRICS_ADDR": "0.0.0.0"}, True, False),
        ({"SIGTRACE_METRICS_ADDR": "::1"}, False, False),
        ({"SIGTRACE_METRICS_ADDR": "localhost"}, False, False),
        ({}, False, False),
    ],
)
def test_metrics_beyond_this_host_without_a_guard_are_warned_about(
    caplog: pytest.LogCaptureFixture, config: dict[str, str], auth: bool, warned: bool
) -> None:
    settings = load_settings({"SIGTRACE_METRICS_PORT": 9464, **config}, {})
    with caplog.at_level(logging.WARNING, logger="sigtrace"):
        check_exposure(settings, auth)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == int(warned), messages
    if warned:
        assert f"SIGTRACE_METRICS_ADDR={config['SIGTRACE_METRICS_ADDR']!r}" in messages[0]
        assert "SIGTRACE_METRICS_TOKEN" in messages[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    yield int(listener.getsockname()[1])
    listener.close()


@pytest.mark.parametrize("under_gunicorn", [False, True])
def test_a_busy_port_names_the_port_and_suggests_when_ready_only_under_gunicorn(
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    busy_port: int,
    under_gunicorn: bool,
) -> None:
    if under_gunicorn:
        monkeypatch.setitem(sys.modules, "gunicorn", types.ModuleType("gunicorn"))
    else:
        monkeypatch.delitem(sys.modules, "gunicorn", raising=False)
    with pytest.raises(ConfigError) as raised:
        init(registry, SIGTRACE_METRICS_PORT=busy_port)
    message = str(raised.value)
    assert message.startswith(f"SIGTRACE_METRICS_PORT={busy_port}: cannot serve metrics")
    assert "SIGTRACE_METRICS_ADDR" not in message
    assert ("when_ready" in message) is under_gunicorn, message
    assert not dispatch.is_instrumented()


def test_an_address_of_no_interface_names_the_address(registry: CollectorRegistry) -> None:
    with pytest.raises(ConfigError) as raised:
        init(registry, SIGTRACE_METRICS_PORT=0, SIGTRACE_METRICS_ADDR="192.0.2.1")
    message = str(raised.value)
    assert message.startswith("SIGTRACE_METRICS_ADDR='192.0.2.1': cannot serve metrics")
    assert "not an address of this host" in message and "when_ready" not in message
    assert not dispatch.is_instrumented()


class Master:
    """What sigtrace.gunicorn.when_ready uses of gunicorn's arbiter."""

    log = logging.getLogger("gunicorn.test")


def master_environment(monkeypatch: pytest.MonkeyPatch, directory: Path, port: int) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    monkeypatch.setenv("SIGTRACE_METRICS_PORT", str(port))


def when_ready_refuses() -> str:
    """The ConfigError message of gunicorn's when_ready hook in the master."""
    with pytest.raises(ConfigError) as raised:
        gunicorn.when_ready(Master())
    return str(raised.value)


def test_preload_with_the_token_in_app_config_is_a_config_error_in_when_ready(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """gunicorn --preload imports the app in the master: its server guards with the
    app.config token, and when_ready (reading the environment) cannot reuse it."""
    port = free_port()
    monkeypatch.delenv("SIGTRACE_METRICS_TOKEN", raising=False)
    master_environment(monkeypatch, tmp_path, port)
    _, ext = init(registry, SIGTRACE_METRICS_TOKEN="from-app-config")
    try:
        message = when_ready_refuses()
        assert message.startswith(f"SIGTRACE_METRICS_PORT={port}:")
        assert "SIGTRACE_METRICS_TOKEN" in message and "not in app.config" in message
    finally:
        ext.close()


def test_an_unknown_propagator_is_a_config_error_not_an_import_error() -> None:
    """OpenTelemetry's propagation API raises when imported with an unknown
    OTEL_PROPAGATORS name; sigtrace imports it only after checking the name."""
    code = (
        "import flask, sigtrace\n"
        "try:\n"
        "    sigtrace.SigTrace(flask.Flask('p'))\n"
        "except sigtrace.ConfigError as error:\n"
        "    print(error)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SIGTRACE_"))}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "OTEL_PROPAGATORS": "tracecontext,b4"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OTEL_PROPAGATORS='tracecontext,b4' (from the environment)")
    assert "installed propagators (baggage, " in result.stdout


def test_a_busy_port_in_the_gunicorn_master_is_a_config_error_without_the_worker_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, busy_port: int
) -> None:
    monkeypatch.setitem(sys.modules, "gunicorn", types.ModuleType("gunicorn"))
    master_environment(monkeypatch, tmp_path, busy_port)
    message = when_ready_refuses()
    assert message.startswith(f"SIGTRACE_METRICS_PORT={busy_port}: cannot serve metrics")
    assert "another process listens there" in message and "when_ready" not in message
