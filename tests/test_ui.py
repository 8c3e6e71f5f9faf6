"""The signals page over HTTP: settings, guard, assets, data, slow sends, workers.

The page in a real browser is tests/test_ui_browser.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing as t
import urllib.error
import urllib.request
from pathlib import Path

import blinker
import flask
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from sigtrace import SigTrace
from sigtrace.config import ConfigError, load_settings
from sigtrace.ui import RECENT_SENDS
from tests.conftest import samples_from_text
from tests.test_exposition import MakeApp, make_app  # noqa: F401 (the fixture)

ns = blinker.Namespace()
placed = ns.signal("ui-order-placed")
never = ns.signal("ui-never-sent")


def ship_order(sender: object, **kwargs: object) -> None:
    return None


def charge_card(sender: object, fail: bool = False, **kwargs: object) -> None:
    if fail:
        raise LookupError("card declined")


def audit(sender: object, **kwargs: object) -> None:
    return None


placed.connect(ship_order)
placed.connect(charge_card)
never.connect(audit)

SHIP = "tests.test_ui.ship_order"
CHARGE = "tests.test_ui.charge_card"
AUDIT = "tests.test_ui.audit"


@pytest.fixture
def ui_app(request: pytest.FixtureRequest) -> MakeApp:
    """test_exposition's apps with the page on and ``GET /charge`` sending
    ``ui-order-placed`` (``?fail=1``: its card receiver raises)."""
    base: MakeApp = request.getfixturevalue("make_app")

    def make(**kwargs: t.Any) -> flask.Flask:
        app = base(SIGTRACE_UI=True, **kwargs)

        @app.get("/charge")
        def charge() -> str:
            placed.send(app, fail=flask.request.args.get("fail") == "1")
            return "charged"

        return app

    return make


def data(client: t.Any, path: str = "/sigtrace/data.json", **headers: str) -> dict[str, t.Any]:
    response = client.get(path, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type == "application/json"
    document: dict[str, t.Any] = response.get_json()
    return document


def receivers(document: dict[str, t.Any]) -> dict[tuple[str, str], dict[str, t.Any]]:
    return {(s["name"], r["name"]): r for s in document["signals"] for r in s["receivers"]}


# --------------------------------------------------------------------------
# Settings


def test_the_page_is_off_by_default(registry: CollectorRegistry) -> None:
    app = flask.Flask("ui-off")
    app.config["SIGTRACE_TRACING"] = False
    ext = SigTrace(app, registry=registry)
    try:
        client = app.test_client()
        assert client.get("/sigtrace").status_code == 404
        assert client.get("/sigtrace/data.json").status_code == 404
        assert app.extensions["sigtrace"].dashboard is None
    finally:
        ext.close()


def test_off_the_page_module_is_never_imported_and_no_span_processor_is_added() -> None:
    code = """
import sys
import blinker, flask
from opentelemetry.sdk.trace import TracerProvider
from sigtrace import SigTrace
provider = TracerProvider()
app = flask.Flask("off")
SigTrace(app, tracer_provider=provider)
blinker.signal("off-signal").connect(lambda sender: None)
with provider.get_tracer("t").start_as_current_span("request"):
    blinker.signal("off-signal").send(app)
print(app.test_client().get("/sigtrace").status_code)
print("sigtrace.ui" in sys.modules)
print(len(provider._active_span_processor._span_processors))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGTRACE_", "OTEL_"))}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["404", "False", "0"]


def test_on_one_span_processor_per_provider_keeps_the_slow_sends(ui_app: MakeApp) -> None:
    provider = TracerProvider()
    ui_app(tracer_provider=provider)
    ui_app(tracer_provider=provider)  # a second app on the same provider
    processors = provider._active_span_processor._span_processors
    assert [type(p).__name__ for p in processors] == ["SlowSends"]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("SIGTRACE_SLOW_THRESHOLD", "0", "positive"),
        ("SIGTRACE_SLOW_THRESHOLD", "nan", "positive"),
        ("SIGTRACE_SLOW_THRESHOLD", "7200", "up to 3600"),
        ("SIGTRACE_SLOW_THRESHOLD", True, "positive"),
        ("SIGTRACE_UI", "maybe", "boolean"),
        ("SIGTRACE_UI_PATH", "", "below '/'"),
        ("SIGTRACE_UI_PATH", "/", "below '/'"),
        ("SIGTRACE_UI_PATH", "sigtrace", "URL path"),
        ("SIGTRACE_TRACE_URL", "http://jaeger:16686/trace/", "{trace_id}"),
        ("SIGTRACE_TRACE_URL", "javascript:alert(1)//{trace_id}", "{trace_id}"),
        ("SIGTRACE_TRACE_URL", "http://tempo /{trace_id}", "{trace_id}"),
    ],
)
def test_bad_ui_settings_are_named(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({key: value}, {})
    assert key in str(error.value) and expected in str(error.value)


def test_ui_settings_defaults_and_values() -> None:
    defaults = load_settings({}, {})
    assert (defaults.ui, defaults.ui_path, defaults.slow_threshold, defaults.trace_url) == (
        False,
        "/sigtrace",
        0.001,
        None,
    )
    settings = load_settings(
        {},
        {
            "SIGTRACE_UI": "on",
            "SIGTRACE_UI_PATH": "/ops/signals/",
            "SIGTRACE_SLOW_THRESHOLD": "0.25",
            "SIGTRACE_TRACE_URL": "https://grafana.example/explore?traceId={trace_id}",
        },
    )
    assert settings.ui and settings.ui_path == "/ops/signals"
    assert settings.slow_threshold == 0.25
    assert settings.trace_url == "https://grafana.example/explore?traceId={trace_id}"


# --------------------------------------------------------------------------
# Serving and guarding


def test_page_and_assets_are_served_by_the_app(ui_app: MakeApp) -> None:
    client = ui_app(SIGTRACE_UI_PATH="/ops/signals").test_client()
    page = client.get("/ops/signals")
    assert page.status_code == 200 and page.content_type == "text/html; charset=utf-8"
    body = page.get_data(as_text=True)
    assert 'src="/ops/signals/ui.js"' in body and 'href="/ops/signals/ui.css"' in body
    assert "http://" not in body.replace('"http://www.w3.org', "") and "https://" not in body
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    script = client.get("/ops/signals/ui.js")
    assert script.status_code == 200 and script.content_type.startswith("text/javascript")
    text = script.get_data(as_text=True)
    assert "createTextNode" in text and "innerHTML" not in text  # names are inserted as text
    assert client.get("/ops/signals/ui.css").content_type.startswith("text/css")
    assert client.get("/ops/signals/../../etc/passwd").status_code == 404
    assert client.get("/ops/signals/index.html").status_code == 404


def test_token_guards_the_page_like_the_metrics_route(ui_app: MakeApp) -> None:
    client = ui_app(SIGTRACE_METRICS_TOKEN="s3cret").test_client()
    for path in ("/sigtrace", "/sigtrace/data.json", "/sigtrace/ui.js"):
        refused = client.get(path)
        assert refused.status_code == 401 == client.get("/metrics").status_code
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get(path, headers={"Authorization": "bearer s3cret"}).status_code == 200


def test_metrics_auth_guards_the_page(ui_app: MakeApp) -> None:
    def with_cookie(request: flask.Request) -> bool:
        return request.cookies.get("ops") == "yes"

    client = ui_app(metrics_auth=with_cookie).test_client()
    assert client.get("/sigtrace").status_code == 403
    assert client.get("/sigtrace/data.json").status_code == 403
    client.set_cookie("ops", "yes")
    assert client.get("/sigtrace/data.json").status_code == 200


def test_page_requests_are_not_timed(ui_app: MakeApp) -> None:
    client = ui_app().test_client()
    client.get("/charge")
    for path in ("/sigtrace", "/sigtrace/ui.js", "/sigtrace/data.json"):
        client.get(path)
    endpoints = {e["endpoint"] for e in data(client)["endpoints"]}
    assert endpoints == {"charge"}


def _http(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_separate_metrics_port_serves_the_page_with_the_same_guard(
    ui_app: MakeApp,
) -> None:
    app = ui_app(SIGTRACE_METRICS_PORT=0, SIGTRACE_METRICS_TOKEN="s3cret")
    port = app.extensions["sigtrace"].metrics_port
    for _ in range(3):
        app.test_client().get("/charge")
    base = f"http://127.0.0.1:{port}"
    assert _http(base + "/sigtrace/data.json")[0] == 401
    assert _http(base + "/sigtrace", token="wrong")[0] == 401
    status, page = _http(base + "/sigtrace", token="s3cret")
    assert status == 200 and b'src="/sigtrace/ui.js"' in page
    status, body = _http(base + "/sigtrace/data.json", token="s3cret")
    assert status == 200
    assert receivers(json.loads(body))[("ui-order-placed", SHIP)]["calls"] == 3
    assert _http(base + "/sigtrace/nothing", token="s3cret")[0] == 404
    status, metrics = _http(base + "/metrics", token="s3cret")
    assert status == 200 and b"sigtrace_signal_sends_total" in metrics


# --------------------------------------------------------------------------
# What the data says


def test_data_has_the_counts_metrics_reports_and_receivers_not_yet_called(
    ui_app: MakeApp,
) -> None:
    client = ui_app().test_client()
    for _ in range(5):
        client.get("/charge")
    assert client.get("/charge?fail=1").status_code == 500
    document = data(client)
    scrape = samples_from_text(client.get("/metrics").get_data(as_text=True))
    found = receivers(document)
    for receiver in (SHIP, CHARGE):
        count = scrape[
            (
                "sigtrace_receiver_duration_seconds_count",
                (("receiver", receiver), ("signal", "ui-order-placed")),
            )
        ]
        assert found[("ui-order-placed", receiver)]["calls"] == count
    assert found[("ui-order-placed", SHIP)]["calls"] in (5, 6)  # blinker's order is not fixed
    assert found[("ui-order-placed", CHARGE)]["calls"] == 6
    assert found[("ui-order-placed", CHARGE)]["errors"] == 1
    assert found[("ui-order-placed", SHIP)]["errors"] == 0
    assert found[("ui-never-sent", AUDIT)] == {
        "name": AUDIT,
        "connected": True,
        "calls": 0,
        "p50": None,
        "p95": None,
        "p99": None,
        "errors": 0,
    }
    charge = found[("ui-order-placed", CHARGE)]
    assert 0 < charge["p50"] <= charge["p95"] <= charge["p99"]
    signal = next(s for s in document["signals"] if s["name"] == "ui-order-placed")
    assert signal["sends"] == 6
    (charge,) = document["endpoints"]
    assert (charge["method"], charge["endpoint"], charge["calls"]) == ("GET", "charge", 6)
    assert charge["errors"] == 1
    assert charge["exceptions"] == [{"name": "LookupError", "count": 1}]
    assert document["merged"] is False and document["recording"] is False


def _traced_app(ui_app: MakeApp, **config: t.Any) -> tuple[flask.Flask, TracerProvider]:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return ui_app(tracer_provider=provider, **config), provider


def test_slow_and_failed_sends_are_kept_with_their_receivers(ui_app: MakeApp) -> None:
    app, _ = _traced_app(
        ui_app,
        SIGTRACE_SLOW_THRESHOLD=1e-9,  # every send is slow
        SIGTRACE_TRACE_URL="http://jaeger.example/trace/{trace_id}",
    )
    client = app.test_client()
    client.get("/charge")
    assert client.get("/charge?fail=1").status_code == 500
    document = data(client)
    assert document["recording"] is True
    assert document["trace_url"] == "http://jaeger.example/trace/{trace_id}"
    ok, failed = document["recent"]
    assert ok["signal"] == failed["signal"] == "ui-order-placed"
    assert sorted(r["name"] for r in ok["receivers"]) == [CHARGE, SHIP]
    assert ok["error"] is None and ok["receivers_called"] == 2
    assert all(0 < r["seconds"] <= ok["seconds"] for r in ok["receivers"])
    assert len(ok["trace_id"]) == 32 and ok["trace_id"] != failed["trace_id"]
    assert failed["error"] == "LookupError"
    # blinker calls receivers in no fixed order: the ship receiver may not have run
    assert failed["receivers"][-1]["name"] == CHARGE
    assert [r["error"] for r in failed["receivers"]][-1] == "LookupError"
    assert failed["receivers_called"] == len(failed["receivers"])


def test_fast_sends_are_not_kept_failed_ones_are_and_the_ring_is_bounded(
    ui_app: MakeApp,
) -> None:
    app, _ = _traced_app(ui_app, SIGTRACE_SLOW_THRESHOLD=3600)
    client = app.test_client()
    for _ in range(5):
        client.get("/charge")
    assert data(client)["recent"] == []
    for _ in range(RECENT_SENDS + 5):
        assert client.get("/charge?fail=1").status_code == 500
    recent = data(client)["recent"]
    assert len(recent) == RECENT_SENDS
    assert all(send["error"] == "LookupError" for send in recent)


def test_a_signal_subclass_with_odd_receivers_does_not_break_the_page(ui_app: MakeApp) -> None:
    class Odd(blinker.Signal):
        pass

    odd = Odd()
    odd.receivers = [ship_order]  # type: ignore[assignment]  # not blinker's mapping
    client = ui_app().test_client()
    client.get("/charge")
    found = receivers(data(client))
    assert found[("ui-order-placed", CHARGE)]["calls"] == 1
    assert found[("ui-never-sent", AUDIT)]["connected"]  # the other signals are still listed
    assert odd.receivers


def test_names_are_data_not_markup(ui_app: MakeApp) -> None:
    hostile = blinker.Namespace().signal("<script>alert('signal')</script>")

    def receiver(sender: object, **kwargs: object) -> None:
        return None

    receiver.__qualname__ = "<img src=x onerror=alert(1)>"
    hostile.connect(receiver)
    app = ui_app()
    hostile.send(app)
    document = data(app.test_client())
    key = ("<script>alert('signal')</script>", "tests.test_ui.<img src=x onerror=alert(1)>")
    assert receivers(document)[key]["calls"] == 1


# --------------------------------------------------------------------------
# gunicorn: the same merged snapshots as /metrics


def test_under_gunicorn_the_page_shows_every_worker_merged(
    tmp_path: Path, servers: list[t.Any]
) -> None:
    pytest.importorskip("gunicorn", reason="gunicorn is a dev dependency: pip install -e '.[dev]'")
    from tests.servers import RECEIVERS, SIGNAL, run_until, start_gunicorn

    gunicorn = start_gunicorn(tmp_path, metrics_port=True, SIGTRACE_UI="1")
    servers.append(gunicorn)
    n = len(gunicorn.load_every_worker(40))  # both workers served
    gunicorn.wait_for_totals(n)

    def page_counts(port: int) -> list[int]:
        status, body = _http(f"http://127.0.0.1:{port}/sigtrace/data.json")
        assert status == 200
        document = json.loads(body)
        assert document["merged"] is True
        found = receivers(document)
        return [found.get((SIGNAL, r), {}).get("calls", 0) for r in RECEIVERS]

    # Any worker's page, and the master's on the metrics port, shows all of them.
    for _ in range(4):
        assert page_counts(gunicorn.port) == [n, n]
    run_until(lambda: page_counts(gunicorn.metrics_port) == [n, n], "the master's page")
