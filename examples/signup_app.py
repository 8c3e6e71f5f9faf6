"""The signup story: a Flask app whose signals sigtrace makes observable.

A ``user-signed-up`` signal has three receivers: a welcome email (slow), a user
counter, and an audit log that occasionally fails. A class-level anonymous
``Signal()`` (``Processor.on_ready``) shows how anonymous signals are named, an
async view awaits an async receiver, and ``/boom`` raises.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import typing as t

from blinker import Namespace, Signal
from flask import Flask, current_app, jsonify

from sigtrace import SigTrace

signals = Namespace()
user_signed_up = signals.signal("user-signed-up", doc="A user finished signing up.")
async_user_signed_up = signals.signal("async-user-signed-up", doc="Signed up via the async API.")


class AuditLogUnavailable(RuntimeError):
    """The audit store did not answer (the demo's occasional receiver failure)."""


class Mailer:
    """Sends the welcome email: the slow receiver (2-8 ms)."""

    def send_welcome_email(self, sender: t.Any, user: str, **extra: t.Any) -> str:
        time.sleep(random.uniform(0.002, 0.008))
        return f"welcome email queued for {user}"


class UserCounter:
    """Counts sign-ups: the fast receiver."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def on_signup(self, sender: t.Any, **extra: t.Any) -> int:
        with self._lock:
            self.count += 1
            return self.count


AUDIT_FAILURE_RATE = 0.05


def write_audit_log(sender: t.Any, user: str, **extra: t.Any) -> None:
    """Writes the audit entry; fails now and then, turning the request into a 500."""
    if random.random() < AUDIT_FAILURE_RATE:
        raise AuditLogUnavailable("audit store timed out")


async def notify_crm(sender: t.Any, user: str, **extra: t.Any) -> str:
    """An async receiver: awaits the (simulated) CRM call."""
    await asyncio.sleep(random.uniform(0.001, 0.004))
    return f"crm notified about {user}"


class Processor:
    """A background job whose class carries an anonymous signal."""

    on_ready = Signal()

    def run(self, job: str) -> None:
        self.on_ready.send(self, job=job)


def warm_cache(sender: Processor, job: str, **extra: t.Any) -> None:
    time.sleep(0.0005)


mailer = Mailer()
counter = UserCounter()
processor = Processor()
user_signed_up.connect(mailer.send_welcome_email)
user_signed_up.connect(counter.on_signup)
user_signed_up.connect(write_audit_log)
async_user_signed_up.connect(notify_crm)
Processor.on_ready.connect(warm_cache)


def create_app(**config: t.Any) -> Flask:
    """The demo app with SigTrace; ``config`` overrides ``app.config`` keys."""
    app = Flask("signup-demo")
    app.config.update(config)

    @app.post("/signup/<name>")
    @app.get("/signup/<name>")
    def signup(name: str) -> t.Any:
        user_signed_up.send(current_app._get_current_object(), user=name, plan="free")  # type: ignore[attr-defined]
        return jsonify(user=name, users=counter.count)

    @app.get("/async-signup/<name>")
    async def async_signup(name: str) -> t.Any:
        app_obj = current_app._get_current_object()  # type: ignore[attr-defined]
        results = await async_user_signed_up.send_async(app_obj, user=name)
        return jsonify(user=name, receivers=len(results))

    @app.get("/process/<job>")
    def process(job: str) -> t.Any:
        processor.run(job)
        return jsonify(job=job)

    @app.get("/boom")
    def boom() -> t.Any:
        raise ZeroDivisionError("the demo's broken route")

    @app.get("/health")
    def health() -> t.Any:
        return jsonify(ok=True)

    SigTrace(app)
    return app
