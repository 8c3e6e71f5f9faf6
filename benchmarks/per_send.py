"""Per send: ``Signal.send`` with 0, 1, 3 or 10 receivers that do nothing (a pyperf
script: ``python -m benchmarks.per_send -o out.json``; see docs/benchmarks.md)."""

from __future__ import annotations

from collections.abc import Callable

import flask
import pyperf  # type: ignore[import-untyped]
from blinker import Namespace
from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from sigtrace import SigTrace

from . import apps

# bare: blinker as shipped; sigtrace-metrics: SIGTRACE_TRACING=false, no receivers (as most
# of Flask's signals); sigtrace-unsampled: tracing on, under an unsampled parent: no span.
RECEIVER_COUNTS = (0, 1, 3, 10)
BENCHMARKS = [("bare", n) for n in RECEIVER_COUNTS] + [("sigtrace-metrics", 0)]
BENCHMARKS += [("sigtrace-unsampled", n) for n in RECEIVER_COUNTS]
_KEPT: list[Callable[..., None]] = []  # the receivers, alive for the worker's lifetime


class Sender:
    """A plain sender, as an app's model or service would send."""


def sends(mode: str, receivers: int) -> Callable[[int], None]:
    """Set up ``mode`` in this worker; return ``run(n)``: ``n`` sends."""
    signal = Namespace().signal(f"bench-{receivers}-receivers")
    for i in range(receivers):
        _KEPT.append(apps.receiver(f"receiver_{i}"))
        signal.connect(_KEPT[-1])  # weakly, as by default

    def run(n: int) -> None:
        send, sender = signal.send, Sender()  # after SigTrace(app): the patched send
        for _ in range(n):
            send(sender, value=1)

    if mode == "bare":
        return run
    spans = None
    if mode == "sigtrace-unsampled":
        spans = (*apps.tracer_provider(), 0)  # no span may be made
        unsampled = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(0))
        context.attach(trace.set_span_in_context(NonRecordingSpan(unsampled)))
    app = flask.Flask("bench")
    app.config["SIGTRACE_TRACING"] = spans is not None
    SigTrace(app)
    run(100)
    apps.Mode(mode, app, spans, {"sigtrace_signal_sends_total": 1}, {signal.name}).check(100)
    return run


def main() -> None:
    runner = pyperf.Runner(program_args=("-m", "benchmarks.per_send"))
    for mode, receivers in BENCHMARKS:
        runner.bench_time_func(f"send {mode} {receivers}", apps.timed(sends, mode, receivers))


if __name__ == "__main__":
    main()
