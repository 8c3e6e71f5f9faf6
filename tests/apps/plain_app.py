"""A Flask app that knows nothing of sigtrace: the zero-code path's test subject.

``tests/test_instrumentor.py`` runs it under the real ``opentelemetry-instrument``
command; whatever it traces and measures comes from the instrumentors the
command loads (opentelemetry-instrumentation-flask and sigtrace's ``blinker``).
It serves on 127.0.0.1, a free port, prints ``listening on port N`` once it
accepts requests, and stops cleanly on SIGTERM (the SDKs flush at exit).
"""

from __future__ import annotations

import time
import typing as t

from blinker import Namespace
from flask import Flask, current_app, jsonify

from tests.apps.serve import serve

signals = Namespace()
order_placed = signals.signal("order-placed")


def charge_card(sender: t.Any, order: str, **extra: t.Any) -> str:
    time.sleep(0.002)
    return f"charged {order}"


def reserve_stock(sender: t.Any, **extra: t.Any) -> int:
    return 1


order_placed.connect(charge_card)
order_placed.connect(reserve_stock)


def create_app() -> Flask:
    app = Flask("plain-shop")

    @app.get("/order/<order>")
    def order(order: str) -> t.Any:
        order_placed.send(current_app._get_current_object(), order=order)  # type: ignore[attr-defined]
        return jsonify(order=order)

    return app


def main() -> None:
    serve(create_app())


if __name__ == "__main__":
    # Run the importable copy, so receivers are labelled tests.apps.plain_app.*
    from tests.apps import plain_app

    plain_app.main()
