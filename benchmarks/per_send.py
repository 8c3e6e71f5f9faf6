"""Per-send cost: one ``Signal.send`` with 0, 1, 3 or 10 trivial receivers.

    python -m benchmarks.per_send -o per_send.json [pyperf options]

A pyperf script; each benchmark runs in its own worker processes:

* ``send bare N``: blinker as shipped;
* ``send sigtrace-metrics 0``: ``SigTrace(app)`` with ``SIGTRACE_TRACING=false``,
  a signal without receivers (what most of Flask's own signals are);
* ``send sigtrace-unsampled N``: metrics and tracing on (a global SDK
  provider), under a current parent span that is not sampled, as in a request
  that arrived with ``traceparent: ...-00``: sigtrace must make no span.
"""

from __future__ import annotations

from collections.abc import Callable

from blinker import Namespace

from . import apps

RECEIVER_COUNTS = (0, 1, 3, 10)
BENCHMARKS = [("bare", n) for n in RECEIVER_COUNTS] + [("sigtrace-metrics", 0)]
BENCHMARKS += [("sigtrace-unsampled", n) for n in RECEIVER_COUNTS]


class Sender:
    """A plain sender, as an app's model or service would send."""


class Sends(apps.Timed):
    """``n`` sends of a signal with ``receivers`` receivers, in ``mode``."""

    def __init__(self, mode: str, receivers: int, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self.mode = mode
        self.receivers = [apps.receiver(f"receiver_{i}") for i in range(receivers)]  # kept alive
        self.signal = Namespace().signal(f"bench-{receivers}-receivers")

    def setup(self) -> None:
        for receiver in self.receivers:
            self.signal.connect(receiver)
        if self.mode == "bare":
            return
        import flask
        from opentelemetry import context, trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        from sigtrace import SigTrace

        spans = None
        if self.mode == "sigtrace-unsampled":
            provider, exporter = apps.tracer_provider()
            spans = (provider, exporter, 0)  # no span may be made
            unsampled = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(0))
            context.attach(trace.set_span_in_context(NonRecordingSpan(unsampled)))
        app = flask.Flask("bench")
        app.config["SIGTRACE_TRACING"] = spans is not None
        SigTrace(app)
        samples = {"sigtrace_signal_sends_total": 1}
        self.run(100)
        apps.Mode(self.mode, app, spans, samples, {self.signal.name}).check(100)

    def run(self, n: int) -> None:
        send, sender = self.signal.send, Sender()
        for _ in range(n):
            send(sender, value=1)


def main() -> None:
    runner, clock = apps.make_runner("benchmarks.per_send")
    for mode, receivers in BENCHMARKS:
        runner.bench_time_func(f"send {mode} {receivers}", Sends(mode, receivers, clock))


if __name__ == "__main__":
    main()
