"""What the demo prints: one span tree per traced request, and a table of the slowest receivers.

:class:`SpanTreePrinter` is an OpenTelemetry ``SpanProcessor``: it keeps the
ended spans of each trace until that trace's local root (the request's server
span) ends, then prints the whole tree with durations, the slowest receiver of
each send marked. :func:`slowest_receivers` reads the receiver metrics from a
Prometheus registry, as a scrape would, and :func:`render_receivers` makes the
short table the demo prints every few seconds.
"""

from __future__ import annotations

import math
import threading
import time
import typing as t
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from prometheus_client import CollectorRegistry

from sigtrace.cli import histogram_quantile

__all__ = [
    "ReceiverStats",
    "SpanTreePrinter",
    "render_receivers",
    "render_tree",
    "slowest_receivers",
]

NAME_WIDTH = 62
MAX_OPEN_TRACES = 1000
"""Traces whose root has not ended yet, kept at most (oldest dropped first)."""
SHOWN_ATTRIBUTES = ("blinker.receivers.called", "http.response.status_code", "error.type")


def _ms(span: ReadableSpan) -> float:
    if span.start_time is None or span.end_time is None:
        return 0.0
    return (span.end_time - span.start_time) / 1e6


def render_tree(spans: t.Sequence[ReadableSpan]) -> str:
    """The spans of one trace as an indented tree (roots: spans whose parent is not here)."""
    ids = {s.context.span_id for s in spans if s.context is not None}
    children: dict[int | None, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        parent = span.parent.span_id if span.parent is not None else None
        children[parent if parent in ids else None].append(span)
    for group in children.values():
        group.sort(key=lambda s: s.start_time or 0)
    lines: list[str] = []

    def walk(span: ReadableSpan, prefix: str, last: bool, depth: int) -> None:
        branch = "" if depth == 0 else ("└── " if last else "├── ")
        label = f"{prefix}{branch}{span.name}"
        kind = span.kind.name
        notes = []
        for key in SHOWN_ATTRIBUTES:
            value = (span.attributes or {}).get(key)
            if value is not None:
                notes.append(f"{key}={value}")
        if span.status.status_code.name == "ERROR":
            notes.insert(0, "ERROR")
        siblings = children.get(span.parent.span_id if span.parent else None, [])
        receivers = [s for s in siblings if s.name.startswith("receiver ")]
        if (
            span.name.startswith("receiver ")
            and len(receivers) > 1
            and span is max(receivers, key=_ms)
        ):
            notes.insert(0, "◀ slowest")
        lines.append(
            f"{label:<{NAME_WIDTH}} {kind:<8} {_ms(span):8.2f} ms  {' '.join(notes)}".rstrip()
        )
        kids = children.get(span.context.span_id if span.context else None, [])
        child_prefix = prefix + ("" if depth == 0 else ("    " if last else "│   "))
        for i, child in enumerate(kids):
            walk(child, child_prefix, i == len(kids) - 1, depth + 1)

    for root in children.get(None, []):
        walk(root, "", True, 0)
    return "\n".join(lines)


class SpanTreePrinter(SpanProcessor):
    """Print each trace's tree when its local root span ends."""

    def __init__(self, write: t.Callable[[str], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._traces: OrderedDict[int, list[ReadableSpan]] = OrderedDict()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None:
            return
        local_root = span.parent is None or span.parent.is_remote
        with self._lock:
            spans = self._traces.setdefault(context.trace_id, [])
            spans.append(span)
            if local_root:
                del self._traces[context.trace_id]
            else:
                while len(self._traces) > MAX_OPEN_TRACES:
                    self._traces.popitem(last=False)
                return
        self._write(render_tree(spans) + "\n")

    def shutdown(self) -> None:
        with self._lock:
            self._traces.clear()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@dataclass
class ReceiverStats:
    signal: str
    receiver: str
    calls: int
    p50: float | None
    p99: float | None
    errors: int


def slowest_receivers(registry: CollectorRegistry, limit: int = 5) -> list[ReceiverStats]:
    """Receivers by p99 (then calls), from the registry's receiver metrics."""
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    errors: dict[tuple[str, str], float] = defaultdict(float)
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "sigtrace_receiver_duration_seconds_bucket":
                key = (sample.labels["signal"], sample.labels["receiver"])
                buckets[key].append((float(sample.labels["le"]), float(sample.value)))
            elif sample.name == "sigtrace_receiver_errors_total":
                errors[(sample.labels["signal"], sample.labels["receiver"])] += sample.value
    rows = []
    for (signal, receiver), pairs in buckets.items():
        pairs.sort()
        calls = int(pairs[-1][1]) if pairs and pairs[-1][0] == math.inf else 0
        if not calls:
            continue
        rows.append(
            ReceiverStats(
                signal,
                receiver,
                calls,
                histogram_quantile(0.5, pairs),
                histogram_quantile(0.99, pairs),
                int(errors.get((signal, receiver), 0)),
            )
        )
    rows.sort(key=lambda r: (r.p99 or 0.0, r.calls), reverse=True)
    return rows[:limit]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.1f} ms"


def render_receivers(rows: t.Sequence[ReceiverStats], now: float | None = None) -> str:
    """A short table: receiver, calls, p50, p99, errors (estimates from the buckets)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    width = max([len("receiver"), *(len(r.receiver) for r in rows)])
    lines = [
        f"── slowest receivers at {stamp} "
        "(since start; p50/p99 estimated from histogram buckets) ──",
        f"{'receiver':<{width}}  {'calls':>6}  {'p50':>9}  {'p99':>9}  {'errors':>6}",
    ]
    for r in rows:
        lines.append(
            f"{r.receiver:<{width}}  {r.calls:>6}  {_duration(r.p50):>9}  "
            f"{_duration(r.p99):>9}  {r.errors:>6}"
        )
    if not rows:
        lines.append("(no receiver calls yet)")
    return "\n".join(lines)
