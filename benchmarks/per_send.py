"""Per-send cost: one ``Signal.send`` with 0, 1, 3 or 10 trivial receivers.

Modes (each in its own worker process):

* ``bare``: blinker as shipped;
* ``sigtrace-metrics``: ``sigtrace.instrument(tracing_enabled=False)``;
* ``sigtrace-unsampled``: metrics and tracing on, under a current parent span
  that is not sampled (a request that arrived with ``traceparent ...-00``):
  sigtrace must make no span objects;
* ``sigtrace-sampled``: metrics and tracing on, under a sampled SDK parent
  span: a signal span plus one span per receiver (batch processor, null
  exporter);
* ``sigtrace-unsampled-py``: as ``sigtrace-unsampled``, with the pure-Python
  histogram core that replaces the C extension where no compiler built it.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import typing as t
from time import perf_counter_ns, process_time_ns

from blinker import Signal

from .worker import serve, start_all

__all__ = ["MODES", "RECEIVER_COUNTS", "run"]

MODES: tuple[str, ...] = (
    "bare",
    "sigtrace-metrics",
    "sigtrace-unsampled",
    "sigtrace-sampled",
    "sigtrace-unsampled-py",
)
RECEIVER_COUNTS: tuple[int, ...] = (0, 1, 3, 10)


class _Sender:
    """A plain sender object, as an app's model or service would send."""


def _receiver(index: int) -> t.Callable[..., None]:
    def receiver(sender: t.Any, **kwargs: t.Any) -> None:
        return None

    # Distinct names, as distinct functions would have: one metric child each.
    receiver.__qualname__ = receiver.__name__ = f"receiver_{index}"
    return receiver


def _signals() -> tuple[dict[int, Signal], list[t.Callable[..., None]]]:
    keep: list[t.Callable[..., None]] = []
    signals: dict[int, Signal] = {}
    for count in RECEIVER_COUNTS:
        signal = Signal(f"bench-{count}-receivers")
        for i in range(count):
            receiver = _receiver(i)
            keep.append(receiver)
            signal.connect(receiver)
        signals[count] = signal
    return signals, keep


def _worker(mode: str) -> None:
    from opentelemetry import context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
    from prometheus_client import CollectorRegistry

    from . import sdk

    signals, _keep = _signals()
    provider = spans = None
    if mode != "bare":
        import sigtrace

        if mode == "sigtrace-unsampled-py":
            from sigtrace import metrics

            # What an install without a C compiler runs (a private switch:
            # only the benchmark and the tests choose the core).
            metrics._core_type = metrics.PyHistogramCore
        if mode.startswith(("sigtrace-unsampled", "sigtrace-sampled")):
            provider, spans = sdk.tracer_provider()
        sigtrace.instrument(
            registry=CollectorRegistry(),
            tracer_provider=provider,
            tracing_enabled=provider is not None,
        )
    if mode.startswith("sigtrace-unsampled"):
        parent: t.Any = NonRecordingSpan(
            SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(0))
        )
        context.attach(trace.set_span_in_context(parent))
    elif mode == "sigtrace-sampled":
        assert provider is not None
        parent = provider.get_tracer("bench").start_span("parent")
        context.attach(trace.set_span_in_context(parent))
    sender = _Sender()
    expected_spans = 0
    plan: dict[int, tuple[int, int]] = {}  # receivers -> (batches, sends per batch)

    def sends(count: int, n: int) -> None:
        nonlocal expected_spans
        send = signals[count].send
        for _ in range(n):
            send(sender, value=1)
        expected_spans += n * (count + 1) if count else 0

    def measure(args: list[str]) -> dict[str, t.Any]:
        count, target_ms = int(args[0]), float(args[1])
        if count not in plan:
            sends(count, 300)  # warm-up: probes, names, metric children, caches
            started = perf_counter_ns()
            sends(count, 300)
            per_send_ns = (perf_counter_ns() - started) / 300
            # Batches of about 0.2 ms, as many as fit in target_ms; the same plan
            # in every round, so rounds stay comparable.
            size = max(1, int(200_000 / per_send_ns))
            plan[count] = (max(5, int(target_ms * 1e6 / (size * per_send_ns))), size)
        batches, size = plan[count]
        stamps = [0] * (batches + 1)
        gc.collect()
        cpu_started = process_time_ns()
        stamps[0] = perf_counter_ns()
        for i in range(1, batches + 1):
            sends(count, size)
            stamps[i] = perf_counter_ns()
        cpu = process_time_ns() - cpu_started
        n = batches * size
        # The median batch is rarely one that another process preempted.
        typical = statistics.median(b - a for a, b in itertools.pairwise(stamps)) / size
        return {
            "us": (stamps[-1] - stamps[0]) / n / 1000,
            "typical_us": typical / 1000,
            "cpu_us": cpu / n / 1000,
            "n": n,
        }

    def stats(args: list[str]) -> dict[str, t.Any]:
        if spans is None or provider is None:
            return {"spans": None, "expected": None}
        provider.force_flush()
        return {"spans": spans.count, "expected": expected_spans}

    serve({"measure": measure, "stats": stats}, {"ready": mode})


def run(rounds: int, target_ms: float, modes: t.Sequence[str] = MODES) -> dict[str, t.Any]:
    """Measure every (mode, receiver count); medians over rounds, paired ratios to bare.

    Each measurement times as many sends as fit in about ``target_ms`` for that
    mode and receiver count (calibrated once, then fixed), in batches of about
    0.2 ms whose median ("typical") is little disturbed by other load.
    """
    workers = start_all(__name__, modes)
    samples: dict[str, dict[int, list[float]]] = {m: {} for m in modes}
    cpu_samples: dict[str, dict[int, list[float]]] = {m: {} for m in modes}
    typical_samples: dict[str, dict[int, list[float]]] = {m: {} for m in modes}
    for m in modes:
        for c in RECEIVER_COUNTS:
            samples[m][c], cpu_samples[m][c], typical_samples[m][c] = [], [], []
    batches: dict[str, dict[int, int]] = {m: {} for m in modes}
    try:
        order = list(modes)
        for r in range(rounds):
            for count in RECEIVER_COUNTS:
                rotated = order[r % len(order) :] + order[: r % len(order)]
                for mode in rotated:
                    answer = workers[mode].ask(f"measure {count} {target_ms}")
                    samples[mode][count].append(answer["us"])
                    cpu_samples[mode][count].append(answer["cpu_us"])
                    typical_samples[mode][count].append(answer["typical_us"])
                    batches[mode][count] = answer["n"]
        checks = {mode: worker.ask("stats") for mode, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    table: dict[str, dict[str, t.Any]] = {}
    for mode in modes:
        table[mode] = {
            str(c): {
                "median_us": statistics.median(v),
                "min_us": min(v),
                "typical_us": statistics.median(typical_samples[mode][c]),
                "cpu_median_us": statistics.median(cpu_samples[mode][c]),
                "sends_per_round": batches[mode][c],
                "rounds_us": v,
                "cpu_rounds_us": cpu_samples[mode][c],
            }
            for c, v in samples[mode].items()
        }
        check = checks[mode]
        table[mode]["spans_exported_fraction"] = (
            check["spans"] / check["expected"] if check["expected"] else None
        )
    if "bare" in table:
        # Paired ratios: each round's mode over the same round's bare, measured
        # moments apart, then the median over rounds. The machine's speed drifts
        # (this kind of machine has slow phases lasting milliseconds to seconds);
        # a pair mostly shares its phase, two medians taken apart need not.
        def paired(series: dict[str, dict[int, list[float]]], mode: str, c: int) -> float:
            return statistics.median(
                m / b for m, b in zip(series[mode][c], series["bare"][c], strict=True)
            )

        for mode in modes:
            for c in RECEIVER_COUNTS:
                entry = table[mode][str(c)]
                entry["ratio_to_bare"] = paired(samples, mode, c)
                entry["typical_ratio_to_bare"] = paired(typical_samples, mode, c)
                entry["cpu_ratio_to_bare"] = paired(cpu_samples, mode, c)
    return {"rounds": rounds, "target_ms": target_ms, "modes": table}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True, choices=MODES)
    args = parser.parse_args()
    _worker(args.worker)


if __name__ == "__main__":
    main()
