"""A Flask app with SigTrace, configured only by environment variables.

The export tests run it in a subprocess, as a user would deploy it: the global
TracerProvider can be set once per process, and sigtrace sets it up from
``OTEL_*`` variables. Run from the repository root::

    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 python -m tests.apps.export_app

It serves on 127.0.0.1, a free port, and prints ``listening on port N``
(flushed) once it accepts requests; SIGTERM stops it cleanly (the SDK flushes
at exit).
"""

from __future__ import annotations

import logging
import time
import typing as t

from blinker import Namespace
from flask import Flask, current_app, jsonify

from sigtrace import SigTrace
from tests.apps.serve import serve

APP_NAME = "export-shop"
FAILING_USER = "fail"

signals = Namespace()
user_signed_up = signals.signal("user-signed-up")


class AuditLogUnavailable(RuntimeError):
    """The audit store is down (raised for the user named ``fail``)."""


def send_welcome_email(sender: t.Any, user: str, **extra: t.Any) -> str:
    time.sleep(0.002)
    return f"welcome {user}"


def count_user(sender: t.Any, **extra: t.Any) -> int:
    return 1


def write_audit_log(sender: t.Any, user: str, **extra: t.Any) -> None:
    if user == FAILING_USER:
        raise AuditLogUnavailable("audit store timed out")


user_signed_up.connect(send_welcome_email)
user_signed_up.connect(count_user)
user_signed_up.connect(write_audit_log)


def create_app() -> Flask:
    app = Flask(APP_NAME)

    @app.get("/signup/<name>")
    def signup(name: str) -> t.Any:
        user_signed_up.send(current_app._get_current_object(), user=name)  # type: ignore[attr-defined]
        return jsonify(user=name)

    @app.get("/health")
    def health() -> t.Any:
        return jsonify(ok=True)

    SigTrace(app)
    return app


def main() -> None:
    # the exporters' warnings (dead endpoint) go to stderr, where the tests count them
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log
    serve(create_app())


if __name__ == "__main__":
    # Run the importable copy, so receivers are labelled tests.apps.export_app.*
    # (labels follow the defining module, which would be __main__ here).
    from tests.apps import export_app

    export_app.main()
