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

import typing as t
from collections.abc import Callable

from blinker import Namespace

from .apps import make_runner

RECEIVER_COUNTS = (0, 1, 3, 10)
BENCHMARKS = [("bare", n) for n in RECEIVER_COUNTS] + [("sigtrace-metrics", 0)]
BENCHMARKS += [("sigtrace-unsampled", n) for n in RECEIVER_COUNTS]


def _receiver(index: int) -> Callable[..., None]:
    def receiver(sender: t.Any, **kwargs: t.Any) -> None:
        return None

    # Distinct names, as distinct functions would have: one metric child each.
    receiver.__qualname__ = receiver.__name__ = f"receiver_{index}"
    return receiver


class Sender:
    """A plain sender, as an app's model or service would send."""


class Sends:
    """pyperf's time function for one benchmark: ``loops`` sends, their time."""

    def __init__(self, mode: str, receivers: int, clock: Callable[[], float]) -> None:
        self.mode, self.clock = mode, clock
        self.receivers = [_receiver(i) for i in range(receivers)]  # kept alive here
        self.signal = Namespace().signal(f"bench-{receivers}-receivers")
        self.ready = False

    def setup(self) -> None:
        for receiver in self.receivers:
            self.signal.connect(receiver)
        if self.mode == "bare":
            return
        import flask

        from sigtrace import SigTrace

        from .apps import scrape

        tracing = self.mode == "sigtrace-unsampled"
        exporter = None
        if tracing:
            from opentelemetry import context, trace
            from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

            from .apps import tracer_provider

            provider, exporter = tracer_provider()
            unsampled = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(0))
            context.attach(trace.set_span_in_context(NonRecordingSpan(unsampled)))
        app = flask.Flask("bench")
        app.config.update(SIGTRACE_TRACING=tracing)
        SigTrace(app)
        # Before timing: the sends are counted, and no span is made.
        self.run(100)
        got = scrape(app, ["sigtrace_signal_sends_total"], {self.signal.name})
        if exporter is not None:
            provider.force_flush()
            got["spans"] = exporter.count
        if got != {"sigtrace_signal_sends_total": 100, **({"spans": 0} if exporter else {})}:
            raise RuntimeError(f"{self.mode}: recorded {got} after 100 sends")

    def __call__(self, loops: int) -> float:
        if not self.ready:  # the first call in this worker process
            self.setup()
            self.ready = True
        started = self.clock()
        self.run(loops)
        return self.clock() - started

    def run(self, n: int) -> None:
        send, sender = self.signal.send, Sender()
        for _ in range(n):
            send(sender, value=1)


def main() -> None:
    runner, clock = make_runner("benchmarks.per_send")
    for mode, receivers in BENCHMARKS:
        runner.bench_time_func(f"send {mode} {receivers}", Sends(mode, receivers, clock))


if __name__ == "__main__":
    main()
