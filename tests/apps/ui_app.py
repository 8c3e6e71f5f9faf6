"""The demo's signup app with the signals page on, for the browser test.

Run as ``python -m tests.apps.ui_app`` with ``SIGTRACE_*`` settings in the
environment. Adds what the demo has not: a receiver connected but never
called, a signal and a receiver whose names are HTML (names come from user
code), and a ``/hostile`` route that sends that signal. The audit receiver fails on a seeded
random sequence, so the run is the same every time.
"""

from __future__ import annotations

import random
import typing as t

from blinker import Namespace
from flask import Flask
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from tests.apps.serve import serve

HOSTILE_SIGNAL = "<img src=x onerror=\"window.hostile='signal'\">"
HOSTILE_RECEIVER = "<script>window.hostile='receiver'</script>"


def _hostile_receiver(sender: t.Any, **extra: t.Any) -> None:
    return None


_hostile_receiver.__qualname__ = HOSTILE_RECEIVER
_hostile_receiver.__module__ = "user"


def _never_called(sender: t.Any, **extra: t.Any) -> None:
    return None


def build() -> Flask:
    """The app, with spans recorded (so the slow sends list fills). Importing this
    module does nothing else: the browser test reads its names."""
    from examples import signup_app

    trace.set_tracer_provider(TracerProvider())
    random.seed(25)
    signup_app.AUDIT_FAILURE_RATE = 0.3
    hostile = Namespace().signal(HOSTILE_SIGNAL)
    hostile.connect(_hostile_receiver)
    # Connected for a sender that never sends: listed, never called.
    signup_app.user_signed_up.connect(_never_called, sender="nobody")
    app = signup_app.create_app()

    @app.get("/hostile")
    def send_hostile() -> str:
        hostile.send(app)
        return "sent"

    return app


if __name__ == "__main__":
    serve(build())
