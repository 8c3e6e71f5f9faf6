"""Metrics pushed over OTLP (gRPC and HTTP) to a real receiver, checked against a real scrape.

The app (``tests/apps/export_app.py``) runs in a subprocess configured only by
``OTEL_*`` variables, as a user would run it. After its traffic stops, the
cumulative values it pushes must equal what its ``/metrics`` serves, series by
series; the OTLP names must translate to the scrape's names under the
OTLP-to-Prometheus translation (see :func:`prometheus_name`).
"""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sigtrace.config import ConfigError
from tests.otlp_receiver import PROTOCOLS, ReceivedPoint
from tests.test_export import ARRIVAL_TIMEOUT, exporting_app

EXPORTED = {
    "sigtrace.signal.sends",
    "sigtrace.signal.duration",
    "sigtrace.receiver.duration",
    "sigtrace.receiver.errors",
    "sigtrace.http.request.duration",
    "sigtrace.http.request.exceptions",
}

# Units as the OTLP-to-Prometheus translation maps them (the OpenTelemetry
# specification's "Prometheus and OpenMetrics Compatibility", implemented by
# Prometheus's otlptranslator); only those this test needs.
_UNIT_SUFFIXES = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": ""}


def prometheus_name(name: str, unit: str, kind: str, monotonic: bool) -> str:
    """The Prometheus name an OTLP metric gets with unit suffixes on (Prometheus's default).

    The documented rules: split the name on every character outside
    ``[a-zA-Z0-9]``; append the unit's Prometheus word unless the unit is an
    annotation in braces or the word is already a token; for a monotonic sum drop
    any ``total`` token and append ``total``; join with ``_``.
    """
    tokens = [token for token in re.split(r"[^a-zA-Z0-9]+", name) if token]
    main_unit = unit.split("/", 1)[0].strip()
    if main_unit and "{" not in main_unit and "}" not in main_unit:
        word = _UNIT_SUFFIXES.get(main_unit, main_unit)
        if word and word not in tokens:
            tokens.append(word)
    if kind == "sum" and monotonic:
        tokens = [token for token in tokens if token != "total"] + ["total"]
    return "_".join(tokens)


def test_prometheus_name_rules() -> None:
    # the examples of the translation rules themselves, independent of sigtrace
    assert prometheus_name("http.server.request.duration", "s", "histogram", False) == (
        "http_server_request_duration_seconds"
    )
    assert (
        prometheus_name("system.network.io", "By", "sum", True) == "system_network_io_bytes_total"
    )
    assert prometheus_name("jobs.done.total", "{job}", "sum", True) == "jobs_done_total"
    assert prometheus_name("queue.size", "{item}", "sum", False) == "queue_size"


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` of the app: {sample name: {sorted labels: value}} for sigtrace's samples."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("sigtrace_"):
                out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def latest(
    points: list[ReceivedPoint],
) -> dict[tuple[str, tuple[tuple[str, str], ...]], ReceivedPoint]:
    """The last point of every (metric, attributes) series: exports are cumulative."""
    out = {}
    for point in points:
        out[(point.name, tuple(sorted(point.attributes.items())))] = point
    return out


def as_samples(
    points: dict[tuple[str, tuple[tuple[str, str], ...]], ReceivedPoint],
) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The received points written as Prometheus samples under their translated names."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for (_, labels), point in points.items():
        base = prometheus_name(point.name, point.unit, point.kind, point.monotonic)
        if point.kind == "sum":
            out.setdefault(base, {})[labels] = point.value
            continue
        out.setdefault(base + "_count", {})[labels] = float(point.count)
        out.setdefault(base + "_sum", {})[labels] = point.sum
        cumulative = 0
        bounds = [*point.explicit_bounds, float("inf")]
        for bound, count in zip(bounds, point.bucket_counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            key = tuple(sorted((*labels, ("le", le))))
            out.setdefault(base + "_bucket", {})[key] = float(cumulative)
    return out


# Signals every request sends, the scrape's own included: their counts move with each scrape.
PER_REQUEST_SIGNALS = {
    "request-started",
    "request-finished",
    "request-tearing-down",
    "appcontext-pushed",
    "appcontext-popped",
    "appcontext-tearing-down",
}


def normalised(samples: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> dict[str, dict]:
    """``le`` values as floats (compare bounds as numbers, not spellings), without the
    series of the signals the scrape itself sends, and without histograms that saw
    nothing (a family's child may exist with count 0; an OTLP point then says nothing)."""
    empty = {
        (name.removesuffix("_count"), labels)
        for name, series in samples.items()
        if name.endswith("_count")
        for labels, value in series.items()
        if value == 0
    }
    out: dict[str, dict] = {}
    for name, series in samples.items():
        for labels, value in series.items():
            if dict(labels).get("signal") in PER_REQUEST_SIGNALS:
                continue
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            if (base, tuple(kv for kv in labels if kv[0] != "le")) in empty:
                continue
            key = tuple((k, float(v) if k == "le" else v) for k, v in labels)
            out.setdefault(name, {})[key] = value
    return out


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_metrics_pushed_over_otlp_equal_the_scrape(protocol: str) -> None:
    with exporting_app(
        protocol,
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_EXPORTER_OTLP_HEADERS="x-sigtrace-test=metrics-1",
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_METRIC_EXPORT_INTERVAL="200",
        OTEL_SERVICE_NAME="metrics-shop",
    ) as (receiver, app):
        for user in ("ada", "grace", "fail", "ada"):
            app.get(f"/signup/{user}")
        app.get("/no-such-page")
        expected = scrape(app.port)
        # the scrape itself is excluded from the metrics, so it stays the truth

        def caught_up(points: list[ReceivedPoint]) -> bool:
            return normalised(as_samples(latest(points))) == normalised(expected)

        try:
            receiver.wait_for_points(caught_up, ARRIVAL_TIMEOUT, "points equal to the scrape")
        except AssertionError:
            got = normalised(as_samples(latest(receiver.points)))
            want = normalised(expected)
            diff = {
                n: (got.get(n), want.get(n))
                for n in set(got) | set(want)
                if got.get(n) != want.get(n)
            }
            raise AssertionError(f"pushed != scraped (pushed, scraped): {diff}") from None
        app.stop()  # its last push is in
        points = latest(receiver.points)
        headers = receiver.metric_headers

    assert {name for name, _ in points} == EXPORTED
    by_name = {name: point for (name, _), point in points.items()}
    for name in ("sigtrace.signal.duration", "sigtrace.receiver.duration",
                 "sigtrace.http.request.duration"):  # fmt: skip
        point = by_name[name]
        assert (point.kind, point.unit, point.temporality) == ("histogram", "s", "CUMULATIVE")
        assert not point.has_min_max  # not tracked: left unset rather than invented
        assert point.explicit_bounds[0] == 5e-06 and point.explicit_bounds[-1] == 10.0
    for name in ("sigtrace.signal.sends", "sigtrace.receiver.errors",
                 "sigtrace.http.request.exceptions"):  # fmt: skip
        point = by_name[name]
        assert (point.kind, point.temporality, point.monotonic) == ("sum", "CUMULATIVE", True)
    errors = [p for (n, _), p in points.items() if n == "sigtrace.receiver.errors"]
    assert [p.attributes for p in errors] == [
        {
            "signal": "user-signed-up",
            "receiver": "tests.apps.export_app.write_audit_log",
            "exception": "AuditLogUnavailable",
        }
    ]
    point = by_name["sigtrace.signal.sends"]
    assert point.resource["service.name"] == "metrics-shop"
    assert point.resource["service.instance.id"]
    assert point.scope == "sigtrace"
    assert 0 < point.start_ns <= point.time_ns
    assert headers and all(h.get("x-sigtrace-test") == "metrics-1" for h in headers)


def test_exemplars_carry_the_trace_ids_of_sampled_requests() -> None:
    with exporting_app(
        "grpc",
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_METRIC_EXPORT_INTERVAL="200",
    ) as (receiver, app):
        app.get("/signup/ada")
        spans = receiver.wait_for(
            lambda spans: [s for s in spans if s.name == "signal user-signed-up"] and spans,
            ARRIVAL_TIMEOUT,
        )

        def with_exemplars(points: list[ReceivedPoint]) -> list[ReceivedPoint]:
            return [p for p in points if p.name == "sigtrace.receiver.duration" and p.exemplars]

        found = receiver.wait_for_points(with_exemplars, ARRIVAL_TIMEOUT, "exemplars")
    # In OTLP's own fields, naming a span that was exported; nothing left as attributes.
    exemplars = [e for p in found for e in p.exemplars]
    assert exemplars and all(e.trace_id and e.span_id and not e.attributes for e in exemplars)
    exported = {(s.trace_id, s.span_id) for s in spans}
    assert {(e.trace_id, e.span_id) for e in exemplars} <= exported


def test_without_the_variable_nothing_is_pushed() -> None:
    with exporting_app(
        "http/protobuf",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_METRIC_EXPORT_INTERVAL="100",
    ) as (receiver, app):
        app.get("/signup/ada")
        # spans arriving proves the app exports to this receiver at all
        receiver.wait_for(lambda spans: spans, ARRIVAL_TIMEOUT)
        assert app.get("/signup/grace")[0] == 200
        app.stop()
        # the app has exited (SIGTERM): a pusher would have made its last export by now
        assert receiver.points == []
        assert receiver.metric_headers == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("OTEL_METRIC_EXPORT_INTERVAL", "soon"),
        ("OTEL_METRIC_EXPORT_TIMEOUT", "-5"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
    ],
)
def test_bad_settings_raise_config_error(
    key: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flask import Flask
    from prometheus_client import CollectorRegistry

    from sigtrace import SigTrace, dispatch

    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv(key, value)
    app = Flask("bad-otlp-settings")
    with pytest.raises(ConfigError) as caught:
        SigTrace(app, registry=CollectorRegistry(), tracer_provider=_null_provider())
    assert key in str(caught.value) and repr(value) in str(caught.value)
    assert not dispatch.is_instrumented()


def _null_provider() -> object:
    from opentelemetry.sdk.trace import TracerProvider

    return TracerProvider()
