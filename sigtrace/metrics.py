"""Metric families and their values, kept in this process's memory.

The traced send records with one C call per value and no lock: a counter
child's ``inc`` is an ``itertools.count``'s ``__next__``, a histogram child's
``record`` is a list's ``append``. prometheus-client takes a lock per
increment and per observation (and an mmap write in multiprocess mode), which
would be most of sigtrace's budget, so these values are written by hand; its
classes still do the exposition (:class:`prometheus_client.registry.Collector`).

A histogram's recorded values wait in their list until they are *tallied*
into bucket counts and a sum: by a scrape, by any other caller of
:meth:`MetricFamily.tally_samples`, or at the latest after :data:`TALLY_INTERVAL`
by one thread per process while sigtrace is instrumented (:data:`TALLIER`),
which bounds the memory they take. Tallying sorts the batch and bisects it
once per bucket bound.

Values are the same in every deployment. Under a multi-process server each
process keeps its own, :mod:`sigtrace.multiprocess_publisher` publishes them and
:mod:`sigtrace.multiprocess_directory` merges them (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import typing as t
import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import prometheus_client
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from . import lifecycle

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_MAX_LABEL_VALUES",
    "TALLIER",
    "TALLY_INTERVAL",
    "OVERFLOW_VALUE",
    "CounterChild",
    "MetricFamily",
    "HistogramChild",
    "HistogramValue",
    "MetricSet",
    "cumulative_buckets",
    "metric_set",
]

log = logging.getLogger("sigtrace")

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.022, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""From 5 µs to 10 s: receivers usually run far below prometheus-client's 5 ms.

Quantiles estimated from these buckets (``histogram_quantile``) interpolate
inside one bucket: 20 and 22 ms are bounds so that a receiver taking a steady
20-22 ms (a 20 ms sleep, a round trip) reads within 10 % at p50 and p99, where
the 10-25 ms bucket alone showed 17.5 ms."""

DEFAULT_MAX_LABEL_VALUES = 500
"""Distinct values one label may take in one family; later values are capped."""

OVERFLOW_VALUE = "__overflow__"
"""The value that label values past the cap are recorded as (capped)."""

TALLY_INTERVAL = 1.0
"""Seconds at most between two tallies of recorded histogram values."""

INF = float("inf")


class CounterChild:
    """A monotonic count of calls to ``inc``, without a lock."""

    __slots__ = ("_base", "_count", "inc")

    def __init__(self) -> None:
        self._count = itertools.count()
        self._base = 0
        # The bound C method itself: calling it is the whole increment.
        self.inc: t.Callable[[], object] = self._count.__next__

    def _total(self) -> int:
        # itertools.count reveals its next value only through its repr.
        return int(repr(self._count)[6:-1])

    def value(self) -> float:
        return float(self._total() - self._base)

    def reset(self) -> None:
        self._base = self._total()


@dataclass
class HistogramValue:
    """A histogram's state: per-bucket counts (not cumulative), sum, exemplars."""

    counts: list[float]
    sum: float
    exemplars: list[Exemplar | None]


class HistogramChild:
    """Observations recorded without a lock, tallied into buckets when read."""

    __slots__ = ("_counts", "_exemplars", "_lock", "_pending", "_sum", "bounds", "record")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # ends with +Inf
        self._pending: list[float] = []
        # The list's own C method: recording a value is one call, atomic under
        # the GIL (and per-list locked on free-threaded builds).
        self.record: t.Callable[[float], None] = self._pending.append
        self._counts = [0] * len(bounds)
        self._sum = 0.0
        # Kept as plain tuples, made Exemplars when read: a NamedTuple's Python-level
        # __new__ would cost each observation with an exemplar more than the rest.
        self._exemplars: list[tuple[dict[str, str], float, float] | None] = [None] * len(bounds)
        self._lock = threading.Lock()

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        """Record ``amount``; keep ``exemplar`` as its bucket's latest."""
        self.record(amount)
        if exemplar is not None:
            self.exemplify(amount, exemplar)

    def exemplify(self, amount: float, exemplar: dict[str, str]) -> None:
        """Keep ``exemplar`` as the latest of the bucket ``amount`` (recorded apart) falls in."""
        index = bisect_left(self.bounds, amount)
        self._exemplars[index] = (exemplar, amount, time.time())

    def tally(self) -> None:
        """Move recorded values into the bucket counts and the sum."""
        with self._lock:
            pending = self._pending
            size = len(pending)
            if not size:
                return
            # Values appended by other threads meanwhile stay after index size.
            batch = pending[:size]
            del pending[:size]
            batch.sort()
            counts = self._counts
            below_previous = 0
            for index, bound in enumerate(self.bounds[:-1]):
                below = bisect_right(batch, bound)
                counts[index] += below - below_previous
                below_previous = below
            counts[-1] += size - below_previous
            self._sum += sum(batch)

    def value(self) -> HistogramValue | None:
        """Tally, then the bucket state, or None before the first observation."""
        self.tally()
        with self._lock:
            if not any(self._counts):
                return None
            exemplars = [None if e is None else Exemplar(*e) for e in self._exemplars]
            return HistogramValue([float(c) for c in self._counts], self._sum, exemplars)

    def reset(self) -> None:
        with self._lock:
            del self._pending[:]
            self._counts = [0] * len(self.bounds)
            self._sum = 0.0
            self._exemplars = [None] * len(self.bounds)


Child = CounterChild | HistogramChild
Sample = tuple[tuple[str, ...], float | HistogramValue]


class MetricFamily:
    """One metric family: children by label values, with a cardinality cap."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        kind: t.Literal["counter", "histogram"],
        buckets: Sequence[float],
        max_label_values: int,
        warned: set[str],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.kind = kind
        self.bounds: tuple[float, ...] = (*sorted(set(buckets) - {INF}), INF)
        self.max_label_values = max_label_values
        # Capped label values -> child. Values past the cap are not keys
        # (they are unbounded) and take the locked path to the overflow child.
        self._children: dict[tuple[str, ...], t.Any] = {}
        self._seen: list[set[str]] = [set() for _ in self.labelnames]
        self._warned = warned  # shared by a MetricSet: one warning per label
        self._lock = threading.Lock()

    def child(self, *values: str) -> t.Any:
        """The child for ``values`` (capped), created once."""
        found = self._children.get(values)
        if found is not None:
            return found
        with self._lock:
            key = self._capped(values)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._make_child(key)
            return child

    def _capped(self, values: tuple[str, ...]) -> tuple[str, ...]:
        capped = []
        for position, value in enumerate(values):
            seen = self._seen[position]
            if value not in seen:
                if len(seen) >= self.max_label_values:
                    label = self.labelnames[position]
                    if label not in self._warned:
                        self._warned.add(label)
                        log.warning(
                            "sigtrace: %s label %r reached %d distinct values; further "
                            "values are recorded as %r (raise SIGTRACE_MAX_LABEL_VALUES "
                            "or exclude signals to change this)",
                            self.name, label, self.max_label_values, OVERFLOW_VALUE,
                        )  # fmt: skip
                    value = OVERFLOW_VALUE
                seen.add(value)
            capped.append(value)
        return tuple(capped)

    def _make_child(self, values: tuple[str, ...]) -> Child:
        if self.kind == "counter":
            return CounterChild()
        return HistogramChild(self.bounds)

    def children(self) -> list[tuple[tuple[str, ...], t.Any]]:
        with self._lock:
            return list(self._children.items())

    def tally_samples(self) -> list[Sample]:
        """Tally pending observations, then each child's value.

        Histograms without observations are left out.
        """
        samples: list[Sample] = []
        for values, child in self.children():
            value = child.value()
            if value is not None:
                samples.append((values, value))
        return samples

    def reset(self) -> None:
        for _, child in self.children():
            child.reset()

    def new_locks(self) -> None:
        self._lock = threading.Lock()
        for child in self._children.values():
            if isinstance(child, HistogramChild):
                child._lock = threading.Lock()

    def tally(self) -> None:
        if self.kind == "histogram":
            for _, child in self.children():
                child.tally()


def prometheus_family(
    family: MetricFamily, samples: Iterable[Sample]
) -> CounterMetricFamily | HistogramMetricFamily:
    """prometheus-client's metric family for ``samples`` of ``family``."""
    if family.kind == "counter":
        counter = CounterMetricFamily(family.name, family.documentation, labels=family.labelnames)
        for values, total in samples:
            counter.add_metric(values, t.cast(float, total))
        return counter
    histogram = HistogramMetricFamily(family.name, family.documentation, labels=family.labelnames)
    les = [floatToGoString(bound) for bound in family.bounds]  # type: ignore[no-untyped-call]
    for values, value in samples:
        value = t.cast(HistogramValue, value)
        rows = zip(les, value.counts, value.exemplars, strict=True)
        histogram.add_metric(values, cumulative_buckets(rows), value.sum)
    return histogram


def cumulative_buckets(rows: Iterable[tuple[str, float, Exemplar | None]]) -> list[t.Any]:
    """prometheus-client's histogram buckets from per-bucket rows, in bound order.

    ``rows`` are ``(le, count in that bucket alone, exemplar or None)``; the
    result is ``(le, cumulative count)`` or ``(le, cumulative count, exemplar)``,
    what :meth:`HistogramMetricFamily.add_metric` takes. Shared by this
    process's exposition and the multiprocess merge.
    """
    buckets: list[t.Any] = []
    cumulative = 0.0
    for le, count, exemplar in rows:
        cumulative += count
        buckets.append((le, cumulative, exemplar) if exemplar else (le, cumulative))
    return buckets


class MetricSet:
    """All sigtrace families of one registry, created once (no duplicates)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        max_label_values: int = DEFAULT_MAX_LABEL_VALUES,
    ) -> None:
        warned: set[str] = set()

        def family(
            name: str, doc: str, labels: Sequence[str], kind: t.Literal["counter", "histogram"]
        ) -> MetricFamily:
            return MetricFamily(name, doc, labels, kind, buckets, max_label_values, warned)

        self.signal_sends = family(
            "sigtrace_signal_sends_total",
            "Signal sends that were not muted, by signal.",
            ("signal",), "counter",
        )  # fmt: skip
        self.signal_duration = family(
            "sigtrace_signal_duration_seconds",
            "Time to run all receivers of a send that reached at least one receiver.",
            ("signal",), "histogram",
        )  # fmt: skip
        self.receiver_duration = family(
            "sigtrace_receiver_duration_seconds",
            "Time one receiver took, awaited work included, by signal and receiver.",
            ("signal", "receiver"), "histogram",
        )  # fmt: skip
        self.receiver_errors = family(
            "sigtrace_receiver_errors_total",
            "Exceptions raised by receivers, by signal, receiver and exception class.",
            ("signal", "receiver", "exception"), "counter",
        )  # fmt: skip
        self.http_duration = family(
            "sigtrace_http_request_duration_seconds",
            "Flask requests, from the app's WSGI call to its answer.",
            ("method", "endpoint", "status"), "histogram",
        )  # fmt: skip
        self.http_exceptions = family(
            "sigtrace_http_request_exceptions_total",
            "Unhandled exceptions reported by got_request_exception.",
            ("method", "endpoint", "exception"), "counter",
        )  # fmt: skip
        self.families = (
            self.signal_sends, self.signal_duration, self.receiver_duration,
            self.receiver_errors, self.http_duration, self.http_exceptions,
        )  # fmt: skip
        self.kept_by_publisher = False
        """Set while a multiprocess publisher keeps these values: in a forked child
        it zeroes them (after writing what a never-published parent recorded)."""
        registry.register(_FamiliesCollector(self.families))
        _tallier.watch(self)

    def reset(self) -> None:
        """Zero every value."""
        for family in self.families:
            family.reset()

    def new_locks(self) -> None:
        """In a forked child: new locks (a parent's thread may have held one at the fork)."""
        for family in self.families:
            family.new_locks()

    def tally(self) -> None:
        for family in self.families:
            family.tally()


class _FamiliesCollector(Collector):
    def __init__(self, families: Iterable[MetricFamily]) -> None:
        self._families = tuple(families)

    def collect(self) -> Iterable[t.Any]:
        for family in self._families:
            yield prometheus_family(family, family.tally_samples())

    def describe(self) -> Iterable[t.Any]:
        # Names only, so the registry refuses a second collector of the same
        # names ("Duplicated timeseries") without collecting at register time.
        for family in self._families:
            if family.kind == "counter":
                yield CounterMetricFamily(family.name, family.documentation)
            else:
                yield HistogramMetricFamily(family.name, family.documentation)


class _Tallier:
    """Tallies every live MetricSet each :data:`TALLY_INTERVAL` on one thread.

    A :class:`~sigtrace.lifecycle.Component` (:data:`TALLIER`), running while
    sigtrace is instrumented. In a forked child it also gives every set new
    locks, whatever the mode: a parent's thread (this one, a scrape, the
    OTLP pusher) may have held one at the fork, and the child would wait for
    it forever. It also zeroes the values the child copied, so that the child
    counts (and scrapes, publishes and pushes over OTLP) only its own sends, in
    every mode; only a set a multiprocess publisher keeps
    (``MetricSet.kept_by_publisher``) is left to the publisher, which runs next
    and first writes what a parent that never published (a uWSGI master, which
    forks from C) recorded, under the parent's name.
    """

    def __init__(self) -> None:
        self._sets: weakref.WeakSet[MetricSet] = weakref.WeakSet()
        self._thread = lifecycle.Periodic("sigtrace-tally", TALLY_INTERVAL, self.tally)

    def watch(self, metric_set: MetricSet) -> None:
        self._sets.add(metric_set)

    def tally(self) -> None:
        for metric_set in list(self._sets):
            metric_set.tally()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop(timeout=_STOP_TIMEOUT, final=False)

    def after_fork_in_child(self) -> None:
        sets = list(self._sets)
        for metric_set in sets:
            metric_set.new_locks()
            if not metric_set.kept_by_publisher:
                metric_set.reset()
        self._thread.start()  # the parent's thread does not run here


_STOP_TIMEOUT = 5.0  # seconds; a tally only sorts and adds
_tallier = _Tallier()
TALLIER = lifecycle.Component(
    "sigtrace-tally",
    lifecycle.Order.METRICS,
    start=_tallier.start,
    stop=_tallier.stop,
    after_fork_in_child=_tallier.after_fork_in_child,
)
"""The tally thread and the metrics' fork handling, run while instrumented."""


_sets: weakref.WeakKeyDictionary[CollectorRegistry, MetricSet] = weakref.WeakKeyDictionary()
_sets_lock = lifecycle.ForkSafeLock()


def metric_set(
    registry: CollectorRegistry | None = None,
    buckets: Sequence[float] = DEFAULT_BUCKETS,
    max_label_values: int = DEFAULT_MAX_LABEL_VALUES,
) -> MetricSet:
    """The registry's :class:`MetricSet`, created on first use and then shared.

    Buckets and the label cap are those of the first call for a registry.
    """
    registry = prometheus_client.REGISTRY if registry is None else registry
    with _sets_lock:
        found = _sets.get(registry)
        if found is None:
            found = MetricSet(registry, buckets, max_label_values)
            _sets[registry] = found
        return found
