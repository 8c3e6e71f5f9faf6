"""Nothing the app handles leaks into metrics or spans unless allow-listed, the
exposition server listens on loopback only by default, and the metrics token and
``metrics_auth`` guard the separate server as they guard the route.

A secret is put everywhere an app carries user data: a signal kwarg, the
sender's ``repr``/``str``, request headers, cookies, the query string and the
body. It must appear nowhere in ``/metrics`` (Prometheus text and OpenMetrics)
nor in any exported span (name, attributes, events, links, status, resource),
checked on each span's JSON and on the OTLP bytes the exporter would send.
"""

from __future__ import annotations

import typing as t
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from blinker import NamedSignal, Signal
from flask import Flask, current_app, request
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from sigtrace import ConfigError, SigTrace, exposition

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.fixture
def secret() -> str:
    return f"s3cr3t-{uuid.uuid4().hex}"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider(resource=Resource.create({"service.name": "security"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


class Customer:
    """A sender whose repr and str carry personal data."""

    on_checkout = Signal()  # an anonymous signal, named after this attribute

    def __init__(self, card: str) -> None:
        self.card = card

    def __repr__(self) -> str:
        return f"Customer(card={self.card!r})"

    __str__ = __repr__


class Declined(Exception):
    pass


def make_app(secret: str) -> tuple[Flask, list[t.Any]]:
    """An app that hands the secret to signals in every way it can."""
    payment_made = NamedSignal("payment-made")
    kept: list[t.Any] = [payment_made]

    def charge(sender: object, card: str, plan: str, **kwargs: object) -> str:
        return "charged"

    def notify(sender: object, **kwargs: object) -> None:
        if kwargs.get("plan") == "declined":
            raise Declined("payment declined")  # no user data in the message

    payment_made.connect(charge)
    payment_made.connect(notify)
    Customer.on_checkout.connect(notify)
    kept += [charge, notify]
    app = Flask("security")

    @app.post("/pay/<plan>")
    def pay(plan: str) -> str:
        body = request.get_json()
        customer = Customer(body["card"])
        payment_made.send(customer, card=body["card"], plan=plan, token=request.args["token"])
        Customer.on_checkout.send(customer, card=body["card"])
        app_obj = current_app._get_current_object()  # type: ignore[attr-defined]
        payment_made.send(app_obj, card=request.headers["X-Card"], plan=plan)
        return "ok"

    @app.get("/boom")
    def boom() -> str:
        raise Declined("boom")

    return app, kept


def exercise(app: Flask, secret: str) -> None:
    client = app.test_client()
    client.set_cookie("session", secret)
    headers = {"Authorization": f"Bearer {secret}", "X-Card": secret, "X-Api-Key": secret}
    response = client.post(f"/pay/gold?token={secret}", json={"card": secret}, headers=headers)
    assert response.status_code == 200
    response = client.post(f"/pay/declined?token={secret}", json={"card": secret}, headers=headers)
    assert response.status_code == 500  # notify raised Declined
    assert client.get(f"/boom?card={secret}", headers=headers).status_code == 500
    assert client.get(f"/missing?card={secret}", headers=headers).status_code == 404


def scrape(app: Flask) -> tuple[str, str]:
    client = app.test_client()
    text = client.get("/metrics")
    openmetrics = client.get("/metrics", headers={"Accept": OPENMETRICS})
    assert text.status_code == openmetrics.status_code == 200
    assert openmetrics.content_type.startswith("application/openmetrics-text")
    return text.text, openmetrics.text


def span_dump(spans: t.Sequence[ReadableSpan]) -> tuple[str, bytes]:
    """Everything a span carries, as JSON and as the OTLP payload."""
    return "\n".join(span.to_json() for span in spans), encode_spans(spans).SerializeToString()


def assert_exercised(text: str, spans: t.Sequence[ReadableSpan]) -> None:
    """The secret's absence means something only if the data was recorded at all."""
    assert 'signal="payment-made"' in text
    assert 'signal="tests.test_security.Customer.on_checkout"' in text
    assert 'exception="Declined"' in text
    names = {span.name for span in spans}
    assert {"POST /pay/<plan>", "signal payment-made", "GET /boom"} <= names
    assert any(event.name == "exception" for span in spans for event in span.events)


def exercise_instrumented(
    app: Flask,
    registry: CollectorRegistry,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    secret: str,
) -> tuple[str, str, t.Sequence[ReadableSpan]]:
    """Exercise ``app`` under SigTrace; its two expositions and its spans, checked non-empty."""
    ext = SigTrace(app, registry=registry, tracer_provider=provider)
    try:
        exercise(app, secret)
        text, openmetrics = scrape(app)
    finally:
        ext.close()
    spans = exporter.get_finished_spans()
    assert_exercised(text, spans)
    return text, openmetrics, spans


def test_no_user_data_reaches_metrics_or_spans_by_default(
    registry: CollectorRegistry,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    secret: str,
) -> None:
    app, _kept = make_app(secret)
    text, openmetrics, spans = exercise_instrumented(app, registry, provider, exporter, secret)
    assert secret not in text, "the secret reached the Prometheus text exposition"
    assert secret not in openmetrics, "the secret reached the OpenMetrics exposition"
    as_json, as_otlp = span_dump(spans)
    assert secret not in as_json, "the secret reached an exported span"
    assert secret.encode() not in as_otlp, "the secret reached the OTLP payload"


def test_record_kwargs_records_only_the_allow_listed_key(
    registry: CollectorRegistry,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    secret: str,
) -> None:
    app, _kept = make_app(secret)
    app.config["SIGTRACE_RECORD_KWARGS"] = ["plan"]
    text, openmetrics, spans = exercise_instrumented(app, registry, provider, exporter, secret)
    payment_spans = [span for span in spans if span.name == "signal payment-made"]
    assert payment_spans
    for span in payment_spans:
        recorded = {
            k: v for k, v in (span.attributes or {}).items() if k.startswith("blinker.kwargs.")
        }
        assert set(recorded) == {"blinker.kwargs.plan"}, recorded
        assert recorded["blinker.kwargs.plan"] in ("gold", "declined")
    checkout = [s for s in spans if s.name == "signal tests.test_security.Customer.on_checkout"]
    assert checkout and all(
        not any(k.startswith("blinker.kwargs.") for k in (s.attributes or {})) for s in checkout
    ), "on_checkout carries no 'plan' kwarg, so nothing is recorded on it"
    as_json, as_otlp = span_dump(spans)
    assert secret not in text + openmetrics
    assert secret not in as_json and secret.encode() not in as_otlp, (
        "only 'plan' is allow-listed, yet the secret reached a span"
    )


# --------------------------------------------------------------------------
# The separate exposition server


def fetch(port: int) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.status, response.read().decode("utf-8")


def bound_address(port: int) -> str:
    """The address the exposition server serving ``port`` listens on."""
    found = [s for (_, bound), s in exposition._servers.items() if bound == port]
    assert len(found) == 1, f"no single exposition server is registered for port {port}"
    return str(found[0].server.server_address[0])


def test_exposition_server_binds_loopback_by_default(
    registry: CollectorRegistry, provider: TracerProvider
) -> None:
    app = Flask("exposition-default")
    app.config["SIGTRACE_METRICS_PORT"] = 0
    signal = NamedSignal("served-signal")
    signal.connect(lambda sender: None, weak=False)
    ext = SigTrace(app, registry=registry, tracer_provider=provider)
    try:
        port = app.extensions["sigtrace"].metrics_port
        assert isinstance(port, int) and port > 0, "the bound port is not exposed"
        signal.send("x")
        status, body = fetch(port)
        assert status == 200 and 'sigtrace_signal_sends_total{signal="served-signal"} 1.0' in body
        assert bound_address(port) == "127.0.0.1", (
            "with no SIGTRACE_METRICS_ADDR the exposition server must listen on loopback only"
        )
    finally:
        ext.close()
    with pytest.raises(urllib.error.URLError):
        fetch(port)  # close() stopped it


def test_start_server_on_port_zero_binds_loopback_and_stops(registry: CollectorRegistry) -> None:
    port = exposition.start_server(0, "127.0.0.1", registry)
    try:
        assert port > 0
        assert bound_address(port) == "127.0.0.1"
        status, _ = fetch(port)
        assert status == 200
    finally:
        exposition.stop_server(port, "127.0.0.1")
    with pytest.raises(urllib.error.URLError):
        fetch(port)


# --------------------------------------------------------------------------
# Who may read the metrics: the token and metrics_auth, on the route and the server


def get(url: str, authorization: str | None = None) -> int:
    request = urllib.request.Request(url)
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read().decode("utf-8")
            assert "sigtrace_signal_sends_total" in body
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_name_is_case_insensitive(
    registry: CollectorRegistry, secret: str, scheme: str
) -> None:
    app = Flask("token-scheme")
    app.config["SIGTRACE_METRICS_TOKEN"] = secret
    ext = SigTrace(app, registry=registry)
    try:
        client = app.test_client()
        assert (
            client.get("/metrics", headers={"Authorization": f"{scheme} {secret}"}).status_code
            == 200
        )
        assert (
            client.get("/metrics", headers={"Authorization": f"{scheme} x{secret}"}).status_code
            == 401
        )
        assert (
            client.get("/metrics", headers={"Authorization": f"Basic {secret}"}).status_code == 401
        )
        assert client.get("/metrics", headers={"Authorization": secret}).status_code == 401
    finally:
        ext.close()


def test_the_separate_server_requires_the_token(registry: CollectorRegistry, secret: str) -> None:
    app = Flask("token-server")
    app.config.update(
        SIGTRACE_METRICS_TOKEN=secret, SIGTRACE_METRICS_PATH="", SIGTRACE_METRICS_PORT=0
    )
    ext = SigTrace(app, registry=registry)
    try:
        url = f"http://127.0.0.1:{app.extensions['sigtrace'].metrics_port}/metrics"
        assert get(url) == 401
        assert get(url, "Bearer wrong") == 401
        assert get(url, f"Basic {secret}") == 401
        assert get(url, f"Bearer {secret}") == 200
        assert get(url, f"bearer {secret}") == 200
    finally:
        ext.close()


def test_the_separate_server_applies_metrics_auth(registry: CollectorRegistry, secret: str) -> None:
    seen: list[str] = []

    def only_with_header(request: t.Any) -> bool:
        seen.append(request.path)
        return bool(request.headers.get("X-Scraper") == "prometheus")

    app = Flask("auth-server")
    app.config.update(SIGTRACE_METRICS_PATH="", SIGTRACE_METRICS_PORT=0)
    ext = SigTrace(app, registry=registry, metrics_auth=only_with_header)
    try:
        port = app.extensions["sigtrace"].metrics_port
        url = f"http://127.0.0.1:{port}/metrics"
        assert get(url) == 403
        request = urllib.request.Request(url, headers={"X-Scraper": "prometheus"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        assert seen == ["/metrics", "/metrics"]
    finally:
        ext.close()


def test_a_running_server_guarded_differently_is_refused_with_the_reason(
    registry: CollectorRegistry, secret: str
) -> None:
    """A second app asking for the same fixed port with another token (or with a
    metrics_auth the running server cannot apply) gets a ConfigError, not an
    unguarded port."""
    first = Flask("first")
    first.config.update(SIGTRACE_METRICS_PATH="", SIGTRACE_METRICS_PORT=0)
    ext = SigTrace(first, registry=registry)
    try:
        port = first.extensions["sigtrace"].metrics_port
        second = Flask("second")
        second.config.update(
            SIGTRACE_METRICS_PATH="", SIGTRACE_METRICS_PORT=port, SIGTRACE_METRICS_TOKEN=secret
        )
        with pytest.raises(ConfigError) as raised:
            SigTrace(second, registry=registry)
        assert "SIGTRACE_METRICS_TOKEN" in str(raised.value) and secret not in str(raised.value)
        third = Flask("third")
        third.config.update(SIGTRACE_METRICS_PATH="", SIGTRACE_METRICS_PORT=port)
        with pytest.raises(ConfigError) as raised:
            SigTrace(third, registry=registry, metrics_auth=lambda request: True)
        assert "metrics_auth" in str(raised.value)
        assert get(f"http://127.0.0.1:{port}/metrics") == 200  # the first app's server runs on
    finally:
        ext.close()


def test_the_gunicorn_master_s_server_requires_the_token(tmp_path: Path, secret: str) -> None:
    """The issue's set-up: gunicorn, multiprocess metrics, the metrics only on the
    separate port that ``sigtrace.gunicorn.when_ready`` serves from the master,
    and a token: without it that port answers 401, with it the workers' metrics."""
    from tests.servers import TOTALS, start_gunicorn

    server = start_gunicorn(
        tmp_path, metrics_port=True, SIGTRACE_METRICS_PATH="", SIGTRACE_METRICS_TOKEN=secret
    )
    metrics_port = server.metrics_port
    try:
        server.signup("ada")
        # The workers publish within an interval; wait for it with the token.
        server.headers = {"Authorization": f"Bearer {secret}"}
        server.wait_for_totals(1, metrics_port)
        assert server.totals(metrics_port) == [1] * len(TOTALS)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        assert get(url) == 401
        assert get(url, "Bearer not-the-token") == 401
        assert get(url, f"Bearer {secret}") == 200
        assert get(server.url("/metrics")) == 404  # SIGTRACE_METRICS_PATH="": no route
    finally:
        server.stop()
    assert not any("Traceback" in line for line in server.log), "\n".join(server.log)
