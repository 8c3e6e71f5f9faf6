"""Both listeners answer any ``Accept`` and ``Authorization`` header without a 500:
the app route (``SIGTRACE_METRICS_PATH``) and the separate server
(``SIGTRACE_METRICS_PORT``). A malformed, huge or unknown ``Accept`` gets the
Prometheus text format; a wrong ``Authorization`` gets 401. And any trace
context headers (``traceparent``, ``tracestate``, ``baggage``) leave a traced
request answered, its trace whole, under the parent OpenTelemetry's propagator
reads from them or none.

Headers are fuzzed with hypothesis: a grammar of media types and parameters
(what prometheus-client parses, and how it can go wrong) and arbitrary
header-safe text, against the Flask test client and real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest
from blinker import Namespace
from flask import Flask
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

from sigtrace import SigTrace

TOKEN = "s3cret-token"
GOOD = f"Bearer {TOKEN}"
TEXT = "text/plain; version=0.0.4; charset=utf-8"

NS = Namespace()
ping = NS.signal("headers-ping")

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Header values: visible latin-1 text and spaces and tabs (no CR, LF or NUL,
# which HTTP forbids and clients refuse to send).
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=200,
) | st.text(st.sampled_from(" \t;,=.0123456789abcdefgilmnoprstuvxyz/-+*\"'"), max_size=120)

media_type = st.sampled_from(
    [
        "application/openmetrics-text",
        "text/plain",
        "*/*",
        "application/json",
        "text/*",
        "",
        "application/openmetrics-text ",
    ]
)
parameter = st.builds(
    "{}={}".format,
    st.sampled_from(["version", "escaping", "q", "charset", "", "VERSION"]),
    st.sampled_from(
        [
            "1.0.0",
            "0.0.1",
            "0.0.4",
            "banana",
            "1.a",
            "",
            "1",
            "2.0.0",
            "99.99.99",
            "values",
            "dots",
            "allow-utf-8",
            "underscores",
            "0.5",
            "1.0.0.0",
            "-1",
            "\u0661.\u0660",  # Arabic-Indic digits: isdigit() but not ASCII
        ]
    ),
)
media_range = st.builds(
    lambda media, params: ";".join([media, *params]), media_type, st.lists(parameter, max_size=4)
)
accept_header = st.builds(", ".join, st.lists(media_range, min_size=1, max_size=4)) | header_text


def lets_in(authorization: str) -> bool:
    """What the guard accepts: ``Bearer`` in any case, then the token; surrounding
    whitespace is not part of a header value (RFC 9110)."""
    scheme, _, given = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and given.strip() == TOKEN


bad_authorization = header_text.filter(lambda value: not lets_in(value)) | st.sampled_from(
    [
        f"Bearer {TOKEN}x",
        f"Bearer  {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer",
        "Bearer ",
        f"Bearer {TOKEN}\t{TOKEN}",
        "Bearer é" * 500,
    ]
)

HUGE_ACCEPTS = [
    "application/openmetrics-text; version=" + "1." * 20_000 + "0",
    ", ".join(["application/openmetrics-text; version=banana"] * 2_000),
    "x" * 60_000,
]


# The series as prometheus-client writes it under each name escaping a client
# may ask for (``escaping=`` in Accept): underscores and allow-utf-8 leave the
# name as it is, dots doubles its underscores, values also prefixes ``U__``.
SERIES = tuple(
    f'{name}{{signal="headers-ping"}}'
    for name in (
        "sigtrace_signal_sends_total",
        "sigtrace__signal__sends__total",
        "U__sigtrace__signal__sends__total",
    )
)


def assert_served(status: int, content_type: str, body: str) -> None:
    assert status in (200, 406), (status, body[:300])
    if status == 200:
        assert content_type.startswith(("text/plain", "application/openmetrics-text"))
        assert any(series in body for series in SERIES), body[:300]


@pytest.fixture
def app(registry: CollectorRegistry) -> Iterator[Flask]:
    app = Flask("headers")
    app.config.update(SIGTRACE_METRICS_TOKEN=TOKEN, SIGTRACE_METRICS_PORT=0)
    ext = SigTrace(app, registry=registry)
    ping.send(None)
    yield app
    ext.close()


def as_wsgi(value: str) -> str:
    """A header as a WSGI server hands it on: its UTF-8 bytes read as latin-1."""
    return value.encode("utf-8").decode("latin-1")


def route_get(app: Flask, headers: dict[str, str]) -> tuple[int, str, str]:
    wsgi = {name: as_wsgi(value) for name, value in headers.items()}
    response = app.test_client().get("/metrics", headers=wsgi)
    return response.status_code, response.content_type or "", response.text


def server_get(app: Flask, headers: dict[str, str]) -> tuple[int, str, str]:
    connection = http.client.HTTPConnection(
        "127.0.0.1", app.extensions["sigtrace"].metrics_port, timeout=10
    )
    try:
        connection.putrequest("GET", "/metrics", skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value.encode("utf-8"))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        connection.close()


GETTERS = {"route": route_get, "server": server_get}


@pytest.mark.parametrize("listener", sorted(GETTERS))
def test_any_accept_header_gets_a_format_never_a_500(app: Flask, listener: str) -> None:
    get = GETTERS[listener]

    @FUZZ
    @given(accept=accept_header)
    def check(accept: str) -> None:
        assert_served(*get(app, {"Accept": accept, "Authorization": GOOD}))

    check()


@pytest.mark.parametrize("listener", sorted(GETTERS))
@pytest.mark.parametrize(
    "accept",
    ["application/openmetrics-text; version=banana", "text/plain; version=x", "application/json"],
)
def test_an_unreadable_or_unknown_accept_gets_the_text_format(
    app: Flask, listener: str, accept: str
) -> None:
    status, content_type, body = GETTERS[listener](app, {"Accept": accept, "Authorization": GOOD})
    assert (status, content_type) == (200, TEXT)
    assert 'sigtrace_signal_sends_total{signal="headers-ping"} 1.0' in body


@pytest.mark.parametrize("listener", sorted(GETTERS))
def test_huge_accept_headers_never_get_a_500(app: Flask, listener: str) -> None:
    for accept in HUGE_ACCEPTS:
        status, content_type, body = GETTERS[listener](
            app, {"Accept": accept, "Authorization": GOOD}
        )
        if listener == "server" and status == 431:
            continue  # the HTTP server refuses a header line over 64 KiB itself
        assert_served(status, content_type, body)


@pytest.mark.parametrize("listener", sorted(GETTERS))
def test_any_wrong_authorization_gets_401(app: Flask, listener: str) -> None:
    get = GETTERS[listener]

    @FUZZ
    @given(authorization=bad_authorization, accept=accept_header)
    def check(authorization: str, accept: str) -> None:
        status, _, body = get(app, {"Authorization": authorization, "Accept": accept})
        assert status == 401, (status, body[:300])
        assert "sigtrace_" not in body

    check()


@pytest.mark.parametrize("listener", sorted(GETTERS))
def test_no_authorization_gets_401_and_the_token_gets_the_metrics(
    app: Flask, listener: str
) -> None:
    assert GETTERS[listener](app, {})[0] == 401
    assert_served(*GETTERS[listener](app, {"Authorization": GOOD}))


# --------------------------------------------------------------------------
# Trace context headers

hex_text = st.text(st.sampled_from("0123456789abcdefABCDEF-x"), min_size=0, max_size=40)
traceparent = (
    st.builds(
        "{}-{}-{}-{}".format,
        st.sampled_from(["00", "01", "ff", "0", "zz"]),
        st.sampled_from(["0" * 32, "ab" * 16]) | hex_text,
        st.sampled_from(["0" * 16, "cd" * 8]) | hex_text,
        st.sampled_from(["00", "01", "ff", "1", ""]),
    )
    | header_text
)
entry = st.builds("{}={}".format, header_text, header_text)
trace_list = st.builds(",".join, st.lists(entry, max_size=40)) | header_text
context_headers = st.fixed_dictionaries(
    {},
    optional={
        "traceparent": traceparent,
        "tracestate": trace_list | st.just("k=" + "v" * 10_000),
        "baggage": trace_list | st.just(",".join(f"k{i}=v" for i in range(5_000))),
    },
)
traced_ping = NS.signal("headers-traced-ping")


@pytest.mark.parametrize("spans", ["all", "slow"])
def test_any_trace_context_headers_leave_the_request_answered_and_its_trace_whole(
    registry: CollectorRegistry, spans: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = Flask("headers-traced")
    app.config.update(SIGTRACE_SPANS=spans, SIGTRACE_SLOW_THRESHOLD=0.000001)

    @app.route("/ping")
    def ping_view() -> str:
        traced_ping.send(None)
        return format(get_current_span().get_span_context().trace_id, "032x")

    traced_ping.connect(lambda sender: None, weak=False)
    ext = SigTrace(app, registry=registry, tracer_provider=provider)
    client = app.test_client()
    propagator = TraceContextTextMapPropagator()

    @FUZZ
    @given(headers=context_headers)
    @example(headers={"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01", "tracestate": "k=v"})
    @example(headers={"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-00", "baggage": "k=v"})
    @example(headers={"traceparent": f"00-{'0' * 32}-{'cd' * 8}-01"})
    def check(headers: dict[str, str]) -> None:
        exporter.clear()
        response = client.get("/ping", headers={k: as_wsgi(v) for k, v in headers.items()})
        assert response.status_code == 200
        finished = exporter.get_finished_spans()
        # the parent is what OpenTelemetry's own propagator reads, or none
        carrier = {k: as_wsgi(v) for k, v in headers.items()}
        parent = get_current_span(propagator.extract(carrier)).get_span_context()
        if parent.is_valid and not parent.trace_flags.sampled:
            assert not finished  # the caller's decision: not sampled, the trace id kept
            assert response.text == format(parent.trace_id, "032x")
            return
        (request,) = [span for span in finished if span.name == "GET /ping"]
        assert response.text == format(request.context.trace_id, "032x")
        if parent.is_valid:
            assert request.parent == parent
        else:
            assert request.parent is None
        # the trace is whole: every span of it descends from the request span
        ids = {span.context.span_id: span for span in finished}
        for span in finished:
            assert span.context.trace_id == request.context.trace_id
            if span is not request:
                assert span.parent is not None and span.parent.span_id in ids

    try:
        check()
    finally:
        ext.close()
