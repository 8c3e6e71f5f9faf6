"""Spans exported over OTLP (gRPC and HTTP/protobuf) to a real receiver.

The app runs in a subprocess (``tests/apps/export_app.py``), configured only by
``OTEL_*`` environment variables as a user would: a process can set the global
TracerProvider once, and sigtrace sets it up itself from those variables.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
import typing as t
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tests.app_process import RunningApp, run_module
from tests.apps.export_app import APP_NAME, FAILING_USER
from tests.otlp_receiver import PROTOCOLS, ReceivedSpan, Receiver, free_port, running_receiver

ARRIVAL_TIMEOUT = 15.0  # seconds for exported spans to reach the receiver
SERVICE = "signup-service"
HEADER_NAME, HEADER_VALUE = "x-sigtrace-test", "token-123"

RECEIVERS = (
    "tests.apps.export_app.send_welcome_email",
    "tests.apps.export_app.count_user",
    "tests.apps.export_app.write_audit_log",
)


# --------------------------------------------------------------------------
# The app in a subprocess (tests/app_process.py)


def app_env(**settings: str) -> dict[str, str]:
    """The test process's environment without OTEL_/SIGTRACE_ settings, plus ``settings``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "SIGTRACE_", "PROMETHEUS_MULTIPROC"))
    }
    env.update(
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        OTEL_BSP_SCHEDULE_DELAY="100",  # milliseconds
        OTEL_EXPORTER_OTLP_TIMEOUT="2",  # seconds, as the Python exporters read it
    )
    env.update(settings)
    return env


def running_app(env: dict[str, str]) -> t.ContextManager[RunningApp]:
    """``python -m tests.apps.export_app``, stopped on leaving the block."""
    return run_module("tests.apps.export_app", env)


@contextmanager
def exporting_app(protocol: str, **settings: str) -> Iterator[tuple[Receiver, RunningApp]]:
    """A receiver for ``protocol`` and the app with ``OTEL_EXPORTER_OTLP_ENDPOINT``
    set to it, plus ``settings`` (:func:`app_env`); the app stops first."""
    with running_receiver(protocol) as receiver:
        env = app_env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, **settings)
        with running_app(env) as app:
            yield receiver, app


# --------------------------------------------------------------------------
# Traces


def new_traceparent() -> tuple[str, str, str]:
    """A sampled W3C traceparent header and its trace and span ids (hex)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def request_trace(
    receiver: Receiver, app: RunningApp, user: str
) -> tuple[int, str, dict[str, ReceivedSpan]]:
    """GET /signup/<user> under a fresh traceparent; its status, span id and spans by name.

    Waits for the whole trace: the server span, the signal span and as many
    receiver spans as the signal span counts (blinker does not order receivers,
    so which ones ran before a failing one varies).
    """
    traceparent, trace_id, remote_parent = new_traceparent()
    status, _ = app.get(f"/signup/{user}", traceparent)

    def complete(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        mine = [s for s in spans if s.trace_id == trace_id]
        signal = [s for s in mine if s.name == "signal user-signed-up"]
        if not signal or not any(s.kind == "SERVER" for s in mine):
            return []
        expected = 2 + int(signal[0].attributes["blinker.receivers.called"])
        return mine if len(mine) >= expected else []

    try:
        spans = receiver.wait_for(complete, ARRIVAL_TIMEOUT, what=f"trace {trace_id}")
    except AssertionError as error:
        partial = sorted(s.name for s in receiver.spans if s.trace_id == trace_id)
        raise AssertionError(
            f"{error}\nof this trace: {partial}\napp stderr:\n{app.stderr}"
        ) from None
    by_name = {s.name: s for s in spans}
    assert len(by_name) == len(spans), sorted(s.name for s in spans)
    return status, remote_parent, by_name


@pytest.fixture(scope="module", params=PROTOCOLS)
def exporting(request: pytest.FixtureRequest) -> Iterator[tuple[Receiver, RunningApp]]:
    """A receiver and the app exporting to it, by OTEL_* variables only."""
    protocol: str = request.param
    with exporting_app(
        protocol,
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_SERVICE_NAME=SERVICE,
        OTEL_EXPORTER_OTLP_HEADERS=f"{HEADER_NAME}={HEADER_VALUE}",
        OTEL_EXPORTER_OTLP_COMPRESSION="gzip",
    ) as (receiver, app):
        yield receiver, app


def test_request_signal_and_receiver_spans_form_one_tree(
    exporting: tuple[Receiver, RunningApp],
) -> None:
    receiver, app = exporting
    status, remote_parent, spans = request_trace(receiver, app, "alice")
    assert status == 200
    server = spans["GET /signup/<name>"]
    assert server.kind == "SERVER"
    assert server.parent_span_id == remote_parent
    assert server.attributes == {
        "http.request.method": "GET",
        "http.route": "/signup/<name>",
        "url.path": "/signup/alice",
        "url.scheme": "http",
        "http.response.status_code": 200,
        "server.address": "127.0.0.1",
        "server.port": app.port,
        "client.address": "127.0.0.1",
        "user_agent.original": f"Python-urllib/{sys.version_info[0]}.{sys.version_info[1]}",
        "network.protocol.version": "1.1",
    }
    assert server.status == "UNSET"
    signal = spans["signal user-signed-up"]
    assert signal.kind == "INTERNAL"
    assert signal.parent_span_id == server.span_id
    assert signal.attributes == {
        "blinker.signal.name": "user-signed-up",
        "blinker.receivers.called": 3,
        "flask.app.name": APP_NAME,
    }
    for name in RECEIVERS:
        span = spans[f"receiver {name}"]
        assert span.kind == "INTERNAL"
        assert span.parent_span_id == signal.span_id
        assert span.attributes == {
            "blinker.signal.name": "user-signed-up",
            "code.function.name": name,
        }
        assert span.status == "UNSET"
        assert signal.start_ns <= span.start_ns <= span.end_ns <= signal.end_ns


def test_a_failing_receiver_exports_error_spans(exporting: tuple[Receiver, RunningApp]) -> None:
    receiver, app = exporting
    status, _, spans = request_trace(receiver, app, FAILING_USER)
    assert status == 500
    audit = spans["receiver tests.apps.export_app.write_audit_log"]
    assert audit.status == "ERROR"
    assert audit.attributes["error.type"] == "tests.apps.export_app.AuditLogUnavailable"
    assert [name for name, _ in audit.events] == ["exception"]
    assert spans["signal user-signed-up"].status == "ERROR"
    server = spans["GET /signup/<name>"]
    assert server.status == "ERROR"
    assert server.attributes["http.response.status_code"] == 500
    assert server.attributes["error.type"] == "tests.apps.export_app.AuditLogUnavailable"
    receivers = [s for s in spans.values() if s.name.startswith("receiver ")]
    assert len(receivers) == spans["signal user-signed-up"].attributes["blinker.receivers.called"]
    assert all(s.status == "UNSET" for s in receivers if s is not audit)


def test_the_resource_names_the_service_from_otel_service_name(
    exporting: tuple[Receiver, RunningApp],
) -> None:
    receiver, app = exporting
    _, _, spans = request_trace(receiver, app, "bob")
    assert {s.resource.get("service.name") for s in spans.values()} == {SERVICE}
    assert all(s.resource.get("telemetry.sdk.name") == "opentelemetry" for s in spans.values())


def test_otlp_headers_and_compression_from_the_environment_are_used(
    exporting: tuple[Receiver, RunningApp],
) -> None:
    receiver, app = exporting
    request_trace(receiver, app, "carol")
    headers = receiver.headers
    assert headers, "no export request recorded"
    assert all(h.get(HEADER_NAME) == HEADER_VALUE for h in headers)
    if receiver.protocol == "http/protobuf":  # a gRPC server does not show the encoding
        assert all(h.get("content-encoding") == "gzip" for h in headers)


def test_without_otel_service_name_the_flask_app_name_is_the_service() -> None:
    with exporting_app(
        "http/protobuf",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
    ) as (receiver, app):
        _, _, spans = request_trace(receiver, app, "dave")
    assert {s.resource.get("service.name") for s in spans.values()} == {APP_NAME}


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param(
            {"OTEL_EXPORTER_OTLP_INSECURE": "true"}, id="insecure-endpoint-without-scheme"
        ),
        pytest.param({"OTEL_EXPORTER_OTLP_COMPRESSION": "none"}, id="compression-none"),
    ],
)
def test_grpc_exporter_settings_from_the_environment(settings: dict[str, str]) -> None:
    with running_receiver("grpc") as receiver:
        endpoint = receiver.endpoint
        if "OTEL_EXPORTER_OTLP_INSECURE" in settings:
            endpoint = f"127.0.0.1:{receiver.port}"  # no scheme: insecure comes from the variable
        env = app_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
            OTEL_SERVICE_NAME=SERVICE,
            **settings,
        )
        with running_app(env) as app:
            status, _, spans = request_trace(receiver, app, "erin")
    assert status == 200
    assert spans["GET /signup/<name>"].kind == "SERVER"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_requests_succeed_while_the_endpoint_is_down_and_spans_flow_once_it_is_up(
    protocol: str,
) -> None:
    port = free_port()
    env = app_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_SERVICE_NAME=SERVICE,
        OTEL_EXPORTER_OTLP_TIMEOUT="1",
    )
    with running_app(env) as app:
        down_started = time.monotonic()
        requests = 0
        while time.monotonic() - down_started < DOWN_SECONDS or FAILED not in app.stderr:
            assert time.monotonic() - down_started < 20, f"no export failure logged:\n{app.stderr}"
            status, _elapsed = app.get(f"/signup/down-{requests}", new_traceparent()[0])
            assert status == 200  # that requests never wait on the exporter: test_faults
            requests += 1
            time.sleep(0.05)
        down_log = app.stderr

        with running_receiver(protocol, port) as receiver:
            arrived = _spans_after_recovery(receiver, app)
    assert arrived, f"no span made after recovery arrived; stderr:\n{app.stderr}"
    # every failed batch is a failure, but the log says so once, not per batch
    lines = [line for line in down_log.splitlines() if "opentelemetry.exporter" in line]
    print(f"{protocol}: {requests} requests, {len(lines)} exporter log lines while down")
    assert 1 <= len(lines) <= MAX_EXPORTER_LINES, "\n".join(lines)


FAILED = "Failed to export"  # both exporters' message for a dropped batch
DOWN_SECONDS = 3.0  # with a 1 s export timeout: several failed batches
MAX_EXPORTER_LINES = 4  # one per message template (about 10 unfiltered)


def server_span_of(trace_id: str) -> t.Callable[[list[ReceivedSpan]], bool]:
    def arrived(spans: list[ReceivedSpan]) -> bool:
        return any(s.trace_id == trace_id and s.kind == "SERVER" for s in spans)

    return arrived


def _spans_after_recovery(receiver: Receiver, app: RunningApp) -> list[str]:
    """Request until a request's server span arrives (20 s at most); its trace id."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        traceparent, trace_id, _ = new_traceparent()
        status, _ = app.get("/signup/after-recovery", traceparent)
        assert status == 200
        try:
            receiver.wait_for(server_span_of(trace_id), timeout=1.0)
        except AssertionError:
            continue
        return [trace_id]
    return []


def test_the_last_spans_are_flushed_at_exit() -> None:
    with exporting_app(
        "grpc",
        OTEL_SERVICE_NAME=SERVICE,
        OTEL_BSP_SCHEDULE_DELAY="60000",  # nothing leaves before exit
    ) as (receiver, app):
        traceparent, trace_id, _ = new_traceparent()
        assert app.get("/signup/frank", traceparent)[0] == 200
        assert receiver.spans == []
        app.stop()
        spans = receiver.wait_for(
            lambda spans: [s for s in spans if s.trace_id == trace_id], timeout=5.0
        )
    assert {s.name for s in spans} >= {"GET /signup/<name>", "signal user-signed-up"}


def test_a_dead_endpoint_does_not_hold_up_exit() -> None:
    env = app_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        OTEL_SERVICE_NAME=SERVICE,
    )
    del env["OTEL_EXPORTER_OTLP_TIMEOUT"]  # the default 10 s: retries for about 8 s
    with running_app(env) as app:
        assert app.get("/signup/gina", new_traceparent()[0])[0] == 200
        app.wait_for_stderr("Transient error", timeout=10)  # an export is retrying
        took = app.stop()
    # the exit hook waits tracing.EXIT_FLUSH_SECONDS (2 s), then stops the retries
    assert took < 6.0, f"exit took {took:.1f}s"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_endpoint_that_never_answers_holds_up_neither_requests_nor_exit(
    protocol: str,
) -> None:
    """A collector that accepts the connection and then says nothing (hung, or
    a firewall that drops replies) with the default 10 s export timeouts, for
    spans and for metrics over OTLP."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(20)
        env = app_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{listener.getsockname()[1]}",
            OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
            OTEL_SERVICE_NAME=SERVICE,
            OTEL_METRICS_EXPORTER="otlp",
            OTEL_METRIC_EXPORT_INTERVAL="200",
        )
        del env["OTEL_EXPORTER_OTLP_TIMEOUT"]
        with running_app(env) as app:
            started = time.monotonic()
            for i in range(20):
                assert app.get(f"/signup/silent{i}", new_traceparent()[0])[0] == 200
            served = time.monotonic() - started
            connection, _ = listener.accept()  # the exporter connected: its export waits
            with connection:
                took = app.stop()
            returncode = app._proc.returncode
    assert served < 10.0, f"20 requests took {served:.1f}s"
    # a clean exit, the export in flight abandoned without a crash at finalization
    assert returncode == 0 and "Fatal Python error" not in app.stderr, app.stderr[-3000:]
    # the exit hook waits tracing.EXIT_FLUSH_SECONDS (2 s), stops the exporter, waits
    # EXIT_STOP_SECONDS (1 s) and leaves the request in flight to its daemon thread;
    # the metrics' stop waits at most 2 * otlp_metrics.EXIT_EXPORT_SECONDS (4 s):
    # about 7 s in all (docs/limits.md), plus the interpreter's own exit
    assert took < 8.0, f"exit took {took:.1f}s"


# --------------------------------------------------------------------------
# The receiver itself, fed by the SDK's own exporters in this process


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_receiver_decodes_spans_from_the_sdk_exporters(protocol: str) -> None:
    with running_receiver(protocol) as receiver:
        exporter: t.Any
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True, timeout=5)
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HTTPSpanExporter,
            )

            exporter = HTTPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces", timeout=5)
        provider = TracerProvider(resource=Resource.create({"service.name": "receiver-test"}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        try:
            tracer = provider.get_tracer("tests")
            with tracer.start_as_current_span("outer") as outer:
                outer.set_attribute("answer", 42)
                with tracer.start_as_current_span("inner"):
                    pass
        finally:
            provider.shutdown()
        spans = receiver.wait_for(lambda s: s if len(s) >= 2 else [], timeout=10)
    by_name = {s.name: s for s in spans}
    assert by_name["inner"].parent_span_id == by_name["outer"].span_id
    assert by_name["outer"].parent_span_id == ""
    assert by_name["outer"].attributes == {"answer": 42}
    assert by_name["outer"].resource["service.name"] == "receiver-test"
    assert by_name["outer"].kind == "INTERNAL"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_slow_spans_export_only_slow_or_failing_receivers_with_their_parents(
    protocol: str,
) -> None:
    """SIGTRACE_SPANS=slow over real OTLP: the mailer (2 ms of work) is kept with its
    signal and request spans; any other receiver span exported took the threshold
    or failed; the failing request keeps its failing receiver's error span."""
    threshold = 0.001
    with exporting_app(
        protocol,
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        SIGTRACE_SPANS="slow",
        SIGTRACE_SLOW_THRESHOLD=str(threshold),
    ) as (receiver, app):
        for user in ("alice", FAILING_USER):
            traceparent, trace_id, remote_parent = new_traceparent()
            status, _ = app.get(f"/signup/{user}", traceparent)
            assert status == (200 if user == "alice" else 500)

            def complete(spans: list[ReceivedSpan], trace_id: str = trace_id) -> list[ReceivedSpan]:
                mine = [s for s in spans if s.trace_id == trace_id]
                return mine if any(s.kind == "SERVER" for s in mine) else []

            spans = receiver.wait_for(complete, ARRIVAL_TIMEOUT, what=f"trace {trace_id}")
            by_id = {s.span_id: s for s in spans}
            server = next(s for s in spans if s.kind == "SERVER")
            assert server.parent_span_id == remote_parent
            signal = next(s for s in spans if s.name == "signal user-signed-up")
            assert signal.parent_span_id == server.span_id
            receivers = [s for s in spans if s.name.startswith("receiver ")]
            for span in receivers:  # no orphans, and each kept by the rule
                assert span.parent_span_id == signal.span_id and signal.span_id in by_id
                took = (span.end_ns - span.start_ns) / 1e9
                assert took >= threshold or span.status == "ERROR", span.name
            names = {s.name for s in receivers}
            if user == "alice":
                assert "receiver tests.apps.export_app.send_welcome_email" in names
            else:
                audit = by_id[
                    next(s.span_id for s in receivers if s.name.endswith("write_audit_log"))
                ]
                assert audit.status == "ERROR"
                assert [name for name, _ in audit.events] == ["exception"]
