"""A Flask app with SigTrace for the gunicorn tests: ``tests.apps.gunicorn_app:app``.

``GET /signup/<name>`` sends ``gunicorn-signup`` to two receivers and answers
with the worker's pid and the request's trace id (the tests learn the worker
pids, and which worker made which trace, from it). Importing the app sends
``gunicorn-boot`` once (under ``--preload``: once in the master). Every worker
sets ``test_live_workers`` (a ``livesum`` gauge) to 1 at import (not a
``flask`` command): in
multiprocess mode a dead worker's share disappears only when gunicorn's
``child_exit`` hook calls ``mark_process_dead``, so the gauge shows that the
hook ran. ``TEST_CLIENT_GAUGE=0`` leaves the gauge out (prometheus-client
cannot boot a worker whose directory is broken; sigtrace can).
"""

from __future__ import annotations

import os
import sys
import time
import typing as t

from blinker import Namespace
from flask import Flask, jsonify, request
from opentelemetry import trace
from prometheus_client import Gauge

from sigtrace import SigTrace

signals = Namespace()
signed_up = signals.signal("gunicorn-signup")


def send_welcome(sender: t.Any, name: str) -> None:
    return None


def count_signup(sender: t.Any, name: str) -> None:
    return None


signed_up.connect(send_welcome)
signed_up.connect(count_signup)

served = "gunicorn" in sys.modules or "uwsgi" in sys.modules  # not the CLI
if served and os.environ.get("TEST_CLIENT_GAUGE", "1") == "1":
    live_workers = Gauge(
        "test_live_workers", "Workers alive (one per process).", multiprocess_mode="livesum"
    )
    live_workers.set(1)

app = Flask("gunicorn-test")


@app.get("/signup/<name>")
def signup(name: str) -> t.Any:
    signed_up.send(app, name=name)
    context = trace.get_current_span().get_span_context()
    trace_id = format(context.trace_id, "032x") if context.is_valid else None
    return jsonify(pid=os.getpid(), trace_id=trace_id)


@app.get("/hold/<float:seconds>")
def hold(seconds: float) -> t.Any:
    mark = request.args.get("mark")
    if mark:  # tells the test this worker is now busy
        with open(mark, "x"):
            pass
    time.sleep(seconds)  # keeps this (sync) worker busy: the next request goes to another
    return jsonify(pid=os.getpid())


@app.get("/health")
def health() -> t.Any:
    return jsonify(pid=os.getpid())


SigTrace(app)
signals.signal("gunicorn-boot").send("boot")
