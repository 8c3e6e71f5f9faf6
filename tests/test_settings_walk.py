"""Every setting sigtrace reads, with bad values: the app starts with a warning that
names the setting, or init_app raises a ConfigError that names it, and then
leaves nothing behind (blinker unpatched, no thread, no listener, no route).
Never another exception.

The walk covers every key of :data:`sigtrace.config.KEYS` and
:data:`sigtrace.config.OTEL_KEYS`, and every ``SIGTRACE_*`` / ``OTEL_*`` name
the configuration pages of ``docs/`` document.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import blinker
import pytest
from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import sigtrace
from sigtrace import ConfigError, SigTrace, dispatch, exposition, tracing
from sigtrace.config import KEYS, OTEL_KEYS, check_environment

DOCS = Path(__file__).resolve().parent.parent / "docs"
ORIGINAL_SEND = blinker.Signal.send

MISSING_PEM = "/nonexistent/sigtrace-test/ca.pem"

# variable -> bad values (each one a case)
BAD: dict[str, list[object]] = {
    "SIGTRACE_METRICS": ["maybe", 2],
    "SIGTRACE_TRACING": ["2"],
    "SIGTRACE_METRICS_PATH": ["metrics", "/a b"],
    "SIGTRACE_METRICS_PORT": ["99999", "http", -1],
    "SIGTRACE_METRICS_ADDR": ["not an address", "", "a..b"],
    "SIGTRACE_METRICS_TOKEN": ["", "two words"],
    "SIGTRACE_SPANS": ["some"],
    "SIGTRACE_ROOT_SPANS": ["maybe"],
    "SIGTRACE_INCLUDE_SIGNALS": ["[order-*", 5],
    "SIGTRACE_EXCLUDE_SIGNALS": ["user-[ab", [1]],
    "SIGTRACE_EXCLUDED_PATHS": ["health", 3.5],
    "SIGTRACE_RECORD_KWARGS": [7, [None]],
    "SIGTRACE_BUCKETS": ["0.1,0.05", "abc", ""],
    "SIGTRACE_MAX_LABEL_VALUES": ["0", 1.5],
    "SIGTRACE_OTLP_ENDPOINT": ["not a url", "localhost:4317"],
    "SIGTRACE_CONSOLE_SPANS": ["maybe"],
    "SIGTRACE_PUBLISH_INTERVAL": ["0", "-1", "soon", "0.001", "1e-9", "3600"],
    "SIGTRACE_MULTIPROC_ALLOW_SHARED_DIR": ["maybe"],
    "SIGTRACE_SLOW_THRESHOLD": ["0", "-1", "soon", "nan", "3601"],
    "SIGTRACE_UI": ["maybe"],
    "SIGTRACE_UI_PATH": ["", "/", "ui"],
    "SIGTRACE_TRACE_URL": ["http://jaeger/trace/", "javascript:alert(1)//{trace_id}"],
    "OTEL_SDK_DISABLED": ["yes please"],
    "OTEL_TRACES_EXPORTER": ["zipkin", "none,otlp"],
    "OTEL_METRICS_EXPORTER": ["banana"],
    "OTEL_BSP_SCHEDULE_DELAY": ["abc", "-1"],
    "OTEL_BSP_EXPORT_TIMEOUT": ["-1"],
    "OTEL_BSP_MAX_QUEUE_SIZE": ["-5", "many"],
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": ["0", "99999"],
    "OTEL_METRIC_EXPORT_INTERVAL": ["0", "abc"],
    "OTEL_METRIC_EXPORT_TIMEOUT": ["-1"],
    "OTEL_PYTHON_FLASK_EXCLUDED_URLS": ["[", "ok,("],
    "OTEL_PYTHON_EXCLUDED_URLS": ["*health"],
    "OTEL_RESOURCE_ATTRIBUTES": ["team", "a=1,b"],
    "OTEL_PROPAGATORS": ["banana", "tracecontext,b4"],
}
ANY_VALUE = {"OTEL_SERVICE_NAME"}  # documented, but any text is a valid service name
for _signal in ("", "TRACES_", "METRICS_"):
    _prefix = f"OTEL_EXPORTER_OTLP_{_signal}"
    BAD.update(
        {
            f"{_prefix}ENDPOINT": ["not a url", "ftp://collector", "localhost:99999"],
            f"{_prefix}PROTOCOL": ["http/json"],
            f"{_prefix}COMPRESSION": ["brotli"],
            f"{_prefix}TIMEOUT": ["abc", "10000", "0"],
            f"{_prefix}INSECURE": ["maybe"],
            f"{_prefix}HEADERS": ["garbage"],
            f"{_prefix}CERTIFICATE": [MISSING_PEM],
            f"{_prefix}CLIENT_KEY": [MISSING_PEM],
            f"{_prefix}CLIENT_CERTIFICATE": [MISSING_PEM],
        }
    )
for _limit in (
    "OTEL_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_EVENT_COUNT_LIMIT",
    "OTEL_SPAN_LINK_COUNT_LIMIT",
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT",
):
    BAD[_limit] = ["-3", "abc"]

CASES = [(name, value) for name, values in BAD.items() for value in values]

# Read only when metrics are pushed over OTLP: walked with that on, against a closed port.
OTLP_METRICS_CONTEXT = {
    "OTEL_METRICS_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:9/v1/metrics",
}


def needs_otlp_metrics(name: str) -> bool:
    return name.startswith(("OTEL_EXPORTER_OTLP_METRICS_", "OTEL_METRIC_EXPORT_"))


def documented_names() -> set[str]:
    """``SIGTRACE_*`` and ``OTEL_*`` names the configuration pages document: all of
    ``docs/configuration.md`` and ``docs/ui.md``, and ``docs/tracing.md`` from its
    OpenTelemetry variables on (their bad values, metrics over OTLP)."""
    pages = [(DOCS / name).read_text(encoding="utf-8") for name in ("configuration.md", "ui.md")]
    tracing_page = (DOCS / "tracing.md").read_text(encoding="utf-8")
    _, found, otel_section = tracing_page.partition("\n## OpenTelemetry variables\n")
    assert found and "\n## Metrics over OTLP\n" in otel_section
    text = "".join([*pages, otel_section])
    names = set(re.findall(r"(?<![.\w])(?:SIGTRACE|OTEL)_[A-Z_]*[A-Z]\b", text))
    return names


def test_the_walk_covers_every_validated_and_every_documented_setting() -> None:
    assert set(BAD) == set(KEYS) | set(OTEL_KEYS)
    undocumented = documented_names() - set(BAD) - ANY_VALUE
    assert not undocumented, f"documented but not walked: {sorted(undocumented)}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No SIGTRACE_* / OTEL_* from the outside, and no global provider."""
    for key in list(os.environ):
        if key.startswith(("OTEL_", "SIGTRACE_", "PROMETHEUS_MULTIPROC_DIR")):
            monkeypatch.delenv(key)
    assert not tracing.user_configured_provider()
    yield monkeypatch
    assert not tracing.user_configured_provider(), "the walk set up the SDK"


def sigtrace_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("sigtrace")}


def assert_nothing_left(app: Flask, threads_before: set[threading.Thread]) -> None:
    assert not dispatch.is_instrumented()
    assert blinker.Signal.send is ORIGINAL_SEND
    assert "sigtrace" not in app.extensions
    assert "sigtrace_metrics" not in app.view_functions
    assert not exposition._servers, "a metrics server was left listening"
    assert {t for t in sigtrace_threads() - threads_before if t.is_alive()} == set()


@pytest.mark.parametrize(("name", "value"), CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_a_bad_value_is_a_named_config_error_or_a_named_warning(
    registry: CollectorRegistry,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    name: str,
    value: object,
) -> None:
    app = Flask("walk")
    if name.startswith("SIGTRACE_"):
        app.config[name] = value  # objects too: app.config takes any type
        if name in ("SIGTRACE_METRICS_ADDR",):
            app.config["SIGTRACE_METRICS_PORT"] = 0
    else:
        assert isinstance(value, str)
        clean_env.setenv(name, value)
        if needs_otlp_metrics(name):
            for key, setting in OTLP_METRICS_CONTEXT.items():
                if key != name:
                    clean_env.setenv(key, setting)
    threads_before = sigtrace_threads()
    with caplog.at_level(logging.WARNING, logger="sigtrace"):
        try:
            ext = SigTrace(app, registry=registry)
        except ConfigError as error:
            message = str(error)
            assert name in message, message
            assert "expected" in message or "collides" in message, message
            assert_nothing_left(app, threads_before)
            return
    try:
        named = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert named, f"{name}={value!r} was accepted without a word: {caplog.text}"
        assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "sigtrace")
        response = app.test_client().get("/metrics")
        assert response.status_code == 200  # the app started and serves
    finally:
        ext.close()


def test_the_issue_s_values_warn_once_each_and_the_app_starts(
    registry: CollectorRegistry, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    issue = {
        "OTEL_BSP_MAX_QUEUE_SIZE": "-5",
        "OTEL_PYTHON_FLASK_EXCLUDED_URLS": "[",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "10000",
        "OTEL_EXPORTER_OTLP_INSECURE": "maybe",
        "OTEL_METRICS_EXPORTER": "banana",
        "SIGTRACE_INCLUDE_SIGNALS": "[order-*",
    }
    for key, value in issue.items():
        clean_env.setenv(key, value)
    with caplog.at_level(logging.WARNING, logger="sigtrace"):
        ext = SigTrace(Flask("issue"), registry=registry)
    ext.close()
    messages = [r.getMessage() for r in caplog.records]
    for key, value in issue.items():
        assert len([m for m in messages if f"{key}={value!r}" in m]) == 1, (key, messages)
    timeout = next(m for m in messages if "OTEL_EXPORTER_OTLP_TIMEOUT" in m)
    assert "seconds, not milliseconds" in timeout
    queue = next(m for m in messages if "OTEL_BSP_MAX_QUEUE_SIZE" in m)
    assert "using the default, 2048" in queue


def test_a_failure_after_the_server_started_stops_it_and_unpatches(
    registry: CollectorRegistry, clean_env: pytest.MonkeyPatch
) -> None:
    """instrument() refuses options that differ from the running instrumentation's:
    init_app fails after its metrics server started, and takes everything back."""
    sigtrace.instrument(registry=registry, spans="none")
    app = Flask("late-failure")
    app.config["SIGTRACE_METRICS_PORT"] = 0
    threads_before = sigtrace_threads()
    with pytest.raises(ValueError, match="spans"):
        SigTrace(app, registry=registry)
    assert not exposition._servers
    assert {t for t in sigtrace_threads() - threads_before if t.is_alive()} == set()
    assert "sigtrace" not in app.extensions and "sigtrace_metrics" not in app.view_functions
    sigtrace.uninstrument()
    assert blinker.Signal.send is ORIGINAL_SEND


@settings(max_examples=300, deadline=None, database=None)
@given(
    name=st.sampled_from(sorted(OTEL_KEYS)),
    value=st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00")),
)
def test_any_otel_value_is_accepted_warned_about_or_a_config_error_naming_it(
    name: str, value: str
) -> None:
    environ = {"OTEL_METRICS_EXPORTER": "otlp", name: value}  # metrics variables checked too
    try:
        check_environment(environ)
    except ConfigError as error:
        assert str(error).startswith(f"{name}="), str(error)
