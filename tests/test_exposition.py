"""Serving metrics: the app route, its guards, format negotiation, the separate server."""

from __future__ import annotations

import select
import socket
import sys
import time
import typing as t
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import blinker
import flask
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from sigtrace import SigTrace
from sigtrace.exposition import start_server, stop_server
from tests.conftest import samples_from_text

OPENMETRICS = "application/openmetrics-text"
HTTP_TIMEOUT = 5.0

placed = blinker.Namespace().signal("exposition-order-placed")


def ship_order(sender: object, **kwargs: object) -> None:
    return None


placed.connect(ship_order)

SENDS = ("sigtrace_signal_sends_total", (("signal", "exposition-order-placed"),))
SHIP_COUNT = (
    "sigtrace_receiver_duration_seconds_count",
    (("receiver", "tests.test_exposition.ship_order"), ("signal", "exposition-order-placed")),
)

MakeApp = Callable[..., flask.Flask]


@pytest.fixture
def make_app(registry: CollectorRegistry) -> Iterator[MakeApp]:
    """Build apps with SigTrace on the test's registry; close them all afterwards."""
    extensions: list[SigTrace] = []

    def make(
        metrics_auth: Callable[[flask.Request], bool] | None = None,
        tracer_provider: TracerProvider | None = None,
        **config: t.Any,
    ) -> flask.Flask:
        app = flask.Flask("exposition-test")
        app.config["SIGTRACE_TRACING"] = tracer_provider is not None
        app.config.update(config)

        @app.get("/orders")
        def orders() -> str:
            placed.send(app)
            return "placed"

        extensions.append(
            SigTrace(
                app, registry=registry, metrics_auth=metrics_auth, tracer_provider=tracer_provider
            )
        )
        return app

    try:
        yield make
    finally:
        for ext in extensions:
            ext.close()


def http_get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def test_route_serves_prometheus_text_by_default(make_app: MakeApp) -> None:
    client = make_app().test_client()
    for _ in range(3):
        client.get("/orders")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    samples = samples_from_text(response.get_data(as_text=True))
    assert samples[SENDS] == 3
    assert samples[SHIP_COUNT] == 3


def test_route_serves_openmetrics_with_exemplars_when_asked(make_app: MakeApp) -> None:
    provider = TracerProvider()
    app = make_app(tracer_provider=provider)
    with provider.get_tracer("test").start_as_current_span("job") as span:
        placed.send(app)
        trace_id = format(span.get_span_context().trace_id, "032x")
    client = app.test_client()
    response = client.get("/metrics", headers={"Accept": OPENMETRICS})
    assert response.status_code == 200
    assert response.content_type.startswith(OPENMETRICS + "; version=")
    body = response.get_data(as_text=True)
    assert body.endswith("# EOF\n")
    exemplars = [
        s.exemplar.labels
        for family in openmetrics_families(body)
        for s in family.samples
        if s.name == "sigtrace_receiver_duration_seconds_bucket" and s.exemplar is not None
    ]
    assert [e["trace_id"] for e in exemplars] == [trace_id]
    assert all(set(e) == {"trace_id", "span_id"} and len(e["span_id"]) == 16 for e in exemplars)
    # Prometheus text has no exemplars: the same request without Accept drops them.
    plain = client.get("/metrics").get_data(as_text=True)
    assert trace_id not in plain and trace_id in body


def test_empty_metrics_path_disables_the_route(make_app: MakeApp) -> None:
    client = make_app(SIGTRACE_METRICS_PATH="").test_client()
    client.get("/orders")
    assert client.get("/metrics").status_code == 404


def test_token_guards_the_route(make_app: MakeApp) -> None:
    client = make_app(SIGTRACE_METRICS_TOKEN="s3cret").test_client()
    refused = client.get("/metrics")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert "sigtrace_" not in refused.get_data(as_text=True)
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "s3cret"}).status_code == 401
    allowed = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert allowed.status_code == 200
    assert "sigtrace_signal_sends_total" in allowed.get_data(as_text=True)


def test_metrics_auth_callable_refusing_gives_403(make_app: MakeApp) -> None:
    seen: list[str | None] = []

    def only_prometheus(request: flask.Request) -> bool:
        seen.append(request.headers.get("User-Agent"))
        return request.headers.get("User-Agent") == "Prometheus/2.42"

    client = make_app(metrics_auth=only_prometheus).test_client()
    refused = client.get("/metrics", headers={"User-Agent": "curl/8"})
    assert refused.status_code == 403
    assert "sigtrace_" not in refused.get_data(as_text=True)
    assert client.get("/metrics", headers={"User-Agent": "Prometheus/2.42"}).status_code == 200
    assert seen == ["curl/8", "Prometheus/2.42"]


def test_metrics_path_is_not_timed_as_a_request(make_app: MakeApp) -> None:
    client = make_app().test_client()
    client.get("/orders")
    for _ in range(3):
        client.get("/metrics")
    text = client.get("/metrics").get_data(as_text=True)
    endpoints = {
        dict(labels).get("endpoint")
        for name, labels in samples_from_text(text)
        if name == "sigtrace_http_request_duration_seconds_count"
    }
    assert endpoints == {"orders"}


def listening_addresses(port: int) -> set[str] | None:
    """IPv4 addresses listening on ``port`` per /proc/net/tcp (None off Linux)."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        return None
    found = set()
    for line in table.read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_separate_server_on_port_zero_serves_the_same_samples(make_app: MakeApp) -> None:
    app = make_app(SIGTRACE_METRICS_PORT=0)
    port = app.extensions["sigtrace"].metrics_port
    assert isinstance(port, int) and port > 0
    if sys.platform.startswith("linux"):
        assert listening_addresses(port) == {"127.0.0.1"}  # SIGTRACE_METRICS_ADDR's default
    for _ in range(4):
        placed.send(app)
    status, content_type, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=")
    separate = samples_from_text(body)
    route = samples_from_text(app.test_client().get("/metrics").get_data(as_text=True))
    assert separate[SENDS] == route[SENDS] == 4
    assert separate[SHIP_COUNT] == route[SHIP_COUNT] == 4

    status, content_type, body = http_get(f"http://127.0.0.1:{port}/metrics", accept=OPENMETRICS)
    assert content_type.startswith(OPENMETRICS) and body.endswith("# EOF\n")


def test_close_stops_the_separate_server(make_app: MakeApp, registry: CollectorRegistry) -> None:
    app = flask.Flask("exposition-close")
    app.config.update(SIGTRACE_TRACING=False, SIGTRACE_METRICS_PORT=0)
    ext = SigTrace(app, registry=registry)
    port = app.extensions["sigtrace"].metrics_port
    assert http_get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    ext.close()
    with pytest.raises(urllib.error.URLError):
        http_get(f"http://127.0.0.1:{port}/metrics")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_fixed_port_is_shared_and_stops_with_its_last_user(registry: CollectorRegistry) -> None:
    port = free_port()
    assert start_server(port, "127.0.0.1", registry) == port
    try:
        assert start_server(port, "127.0.0.1", registry) == port  # reused, not bound twice
        stop_server(port, "127.0.0.1")
        assert http_get(f"http://127.0.0.1:{port}/metrics")[0] == 200  # one user left
    finally:
        stop_server(port, "127.0.0.1")
    with pytest.raises(urllib.error.URLError):
        http_get(f"http://127.0.0.1:{port}/metrics")


def test_port_zero_binds_a_new_server_each_time(registry: CollectorRegistry) -> None:
    first = start_server(0, "127.0.0.1", registry)
    try:
        second = start_server(0, "127.0.0.1", registry)
        stop_server(second, "127.0.0.1")
    finally:
        stop_server(first, "127.0.0.1")
    assert first != second


def test_idle_connections_are_dropped_and_bounded_and_scrapes_answer_after(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Clients that connect and send nothing (a slowloris, a port scanner) hold
    at most MAX_CONNECTIONS threads, each for CONNECTION_TIMEOUT; the rest are
    closed at once, and nothing is printed for them."""
    from sigtrace import exposition

    timeout = 3.0
    monkeypatch.setattr(exposition._QuietHandler, "timeout", timeout)
    monkeypatch.setattr(exposition, "MAX_CONNECTIONS", 8)
    port = start_server(0, "127.0.0.1", registry)
    connected: dict[socket.socket, float] = {}
    closed_after: dict[socket.socket, float] = {}  # seconds from connect to the server's close
    try:
        for _ in range(20):
            connected[socket.create_connection(("127.0.0.1", port), timeout=5)] = time.monotonic()
        deadline = time.monotonic() + 4 * timeout
        while len(closed_after) < len(connected) and time.monotonic() < deadline:
            waiting = [sock for sock in connected if sock not in closed_after]
            readable, _, _ = select.select(waiting, [], [], 0.1)
            now = time.monotonic()
            for sock in readable:
                assert sock.recv(1) == b""  # closed by the server, nothing sent
                closed_after[sock] = now - connected[sock]
        # A held connection cannot be dropped before its timeout; the others were
        # closed long before it.
        assert len(closed_after) == 20
        assert (
            sorted(after >= timeout for after in closed_after.values()) == [False] * 12 + [True] * 8
        ), sorted(closed_after.values())
        assert http_get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        for sock in connected:
            sock.close()
        stop_server(port, "127.0.0.1")
    assert "Traceback" not in capfd.readouterr().err
