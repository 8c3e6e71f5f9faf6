"""A route sigtrace adds never shadows an app route, nor is shadowed by one: whichever
is registered first, the collision is a ConfigError naming both."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Blueprint, Flask
from prometheus_client import CollectorRegistry

from sigtrace import ConfigError, SigTrace, dispatch
from sigtrace.routes import add_route, check_route


@pytest.fixture
def closing() -> Iterator[list[SigTrace]]:
    extensions: list[SigTrace] = []
    yield extensions
    for ext in extensions:
        ext.close()


def app_with(rule: str, endpoint: str = "orders") -> Flask:
    app = Flask("routes")
    app.add_url_rule(rule, endpoint, lambda **_: "the app's page")
    return app


@pytest.mark.parametrize(
    ("app_rule", "metrics_path"),
    [
        ("/metrics", "/metrics"),
        ("/order/<int:order_id>", "/order/1"),
        ("/shop/<path:rest>", "/shop/internal/metrics"),
    ],
)
def test_an_app_route_registered_first_is_refused_with_both_named(
    registry: CollectorRegistry, app_rule: str, metrics_path: str
) -> None:
    app = app_with(app_rule)
    app.config["SIGTRACE_METRICS_PATH"] = metrics_path
    with pytest.raises(ConfigError) as raised:
        SigTrace(app, registry=registry)
    message = str(raised.value)
    assert f"SIGTRACE_METRICS_PATH={metrics_path!r}" in message
    assert f"route {app_rule!r} (endpoint 'orders')" in message
    assert "set SIGTRACE_METRICS_PATH" in message
    # refused before anything was patched or added
    assert not dispatch.is_instrumented()
    assert "sigtrace_metrics" not in app.view_functions
    assert app.test_client().get(metrics_path).text == "the app's page"


def test_an_app_route_registered_later_is_refused_with_both_named(
    registry: CollectorRegistry, closing: list[SigTrace]
) -> None:
    app = Flask("routes-later")
    closing.append(SigTrace(app, registry=registry))
    with pytest.raises(ConfigError) as raised:

        @app.route("/metrics")
        def my_metrics() -> str:
            return "mine"

    message = str(raised.value)
    assert "the app's route '/metrics' (endpoint 'my_metrics')" in message
    assert "SIGTRACE_METRICS_PATH='/metrics' (endpoint 'sigtrace_metrics')" in message
    assert "my_metrics" not in app.view_functions or all(
        rule.endpoint != "my_metrics" for rule in app.url_map.iter_rules()
    )
    assert "sigtrace_signal_sends_total" in app.test_client().get("/metrics").text


def test_a_blueprint_route_registered_later_is_refused(
    registry: CollectorRegistry, closing: list[SigTrace]
) -> None:
    app = Flask("routes-blueprint")
    app.config["SIGTRACE_METRICS_PATH"] = "/admin/metrics"
    closing.append(SigTrace(app, registry=registry))
    admin = Blueprint("admin", __name__, url_prefix="/admin")
    admin.add_url_rule("/<page>", "page", lambda page: page)
    with pytest.raises(ConfigError, match=r"route '/admin/<page>' \(endpoint 'admin.page'\)"):
        app.register_blueprint(admin)


def test_routes_that_do_not_collide_are_added_both_ways(
    registry: CollectorRegistry, closing: list[SigTrace]
) -> None:
    app = app_with("/metrics/", "slash")  # only with the slash: GET /metrics is not it
    app.add_url_rule("/metrics", "post_metrics", lambda: "posted", methods=["POST"])
    closing.append(SigTrace(app, registry=registry))
    app.add_url_rule("/orders/<int:order_id>", "order", lambda order_id: str(order_id))
    client = app.test_client()
    assert "sigtrace_signal_sends_total" in client.get("/metrics").text
    assert client.post("/metrics").text == "posted"
    assert client.get("/metrics/").text == "the app's page"
    assert client.get("/orders/3").text == "3"


def test_check_route_and_add_route_serve_any_sigtrace_route() -> None:
    """The same check for any route sigtrace adds, named by its own setting."""
    app = app_with("/ui")
    with pytest.raises(ConfigError, match=r"SIGTRACE_UI_PATH='/ui' collides with the app's"):
        check_route(app, "SIGTRACE_UI_PATH", "/ui")
    add_route(app, "SIGTRACE_UI_PATH", "/sigtrace/ui", "sigtrace_ui", lambda: "ui")
    with pytest.raises(ConfigError, match=r"collides with sigtrace's SIGTRACE_UI_PATH"):
        app.add_url_rule("/sigtrace/<part>", "mine", lambda part: part)
    assert app.test_client().get("/sigtrace/ui").text == "ui"


@pytest.mark.parametrize(
    ("app_rule", "ui_path"),
    [("/sigtrace", "/sigtrace"), ("/tools/<name>", "/tools/signals")],
)
def test_the_signals_page_colliding_with_an_app_route_is_refused(
    registry: CollectorRegistry, app_rule: str, ui_path: str
) -> None:
    app = app_with(app_rule)
    app.config.update(SIGTRACE_UI=True, SIGTRACE_UI_PATH=ui_path)
    with pytest.raises(ConfigError) as raised:
        SigTrace(app, registry=registry)
    assert f"SIGTRACE_UI_PATH={ui_path!r}" in str(raised.value)
    assert f"route {app_rule!r} (endpoint 'orders')" in str(raised.value)
    assert not dispatch.is_instrumented()
    assert app.test_client().get(ui_path).text == "the app's page"


def test_an_app_route_added_later_under_the_signals_page_is_refused(
    registry: CollectorRegistry, closing: list[SigTrace]
) -> None:
    app = Flask("routes-ui-later")
    app.config["SIGTRACE_UI"] = True
    closing.append(SigTrace(app, registry=registry))
    with pytest.raises(ConfigError, match=r"collides with sigtrace's SIGTRACE_UI_PATH"):
        app.add_url_rule("/sigtrace", "mine", lambda: "mine")
    assert app.test_client().get("/sigtrace").status_code == 200
