"""Metric families and their values, kept in this process's memory.

The traced send records with one C call per value and no lock: a counter
child's ``inc`` is an ``itertools.count``'s ``__next__``, a histogram child's
``record`` is a list's ``append``. prometheus-client takes a lock per
increment and per observation (and an mmap write in multiprocess mode), which
would be most of sigtrace's budget, so these values are written by hand; its
classes still do the exposition (:class:`prometheus_client.registry.Collector`).

A histogram's recorded values wait in their list until they are *folded* into
bucket counts and a sum: by a scrape, by any other reader of
:meth:`MetricFamily.snapshot`, or at the latest after :data:`FOLD_INTERVAL` by one
daemon thread per process, which bounds the memory they take. Folding sorts
the batch and bisects it once per bucket bound.

Values are the same in every deployment. Under a multi-process server each
process keeps its own, and :mod:`sigtrace.multiprocess` publishes and merges
them (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import itertools
import logging
import os
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

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_MAX_LABEL_VALUES",
    "FOLD_INTERVAL",
    "OVERFLOW_VALUE",
    "CounterChild",
    "MetricFamily",
    "HistogramChild",
    "HistogramValue",
    "MetricSet",
    "metric_set",
    "multiprocess_mode",
]

log = logging.getLogger("sigtrace")

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""From 5 µs to 10 s: receivers usually run far below prometheus-client's 5 ms."""

DEFAULT_MAX_LABEL_VALUES = 500
"""Distinct values one label may take in one family before folding."""

OVERFLOW_VALUE = "__overflow__"
"""The value that label values past the cap are folded into."""

FOLD_INTERVAL = 1.0
"""Seconds at most between two folds of recorded histogram values."""

INF = float("inf")


def multiprocess_mode() -> bool:
    """True when ``PROMETHEUS_MULTIPROC_DIR`` is set: values are published for merging."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


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
    """Observations recorded without a lock, folded into buckets when read."""

    __slots__ = ("_counts", "_exemplars", "_lock", "_pending", "_sum", "bounds", "record")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # ends with +Inf
        self._pending: list[float] = []
        # The list's own C method: recording a value is one call, atomic under
        # the GIL (and per-list locked on free-threaded builds).
        self.record: t.Callable[[float], None] = self._pending.append
        self._counts = [0] * len(bounds)
        self._sum = 0.0
        self._exemplars: list[Exemplar | None] = [None] * len(bounds)
        self._lock = threading.Lock()

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        """Record ``amount``; keep ``exemplar`` as its bucket's latest."""
        self.record(amount)
        if exemplar is not None:
            self.exemplify(amount, exemplar)

    def exemplify(self, amount: float, exemplar: dict[str, str]) -> None:
        """Keep ``exemplar`` as the latest of the bucket ``amount`` (recorded apart) falls in."""
        index = bisect_left(self.bounds, amount)
        self._exemplars[index] = Exemplar(exemplar, amount, time.time())

    def fold(self) -> None:
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
        """The folded state, or None before the first observation."""
        self.fold()
        with self._lock:
            if not any(self._counts):
                return None
            return HistogramValue(
                [float(c) for c in self._counts], self._sum, list(self._exemplars)
            )

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
        # Capped label values -> child. Values folded past the cap are not keys
        # (they are unbounded) and take the locked path to the overflow child.
        self._children: dict[tuple[str, ...], t.Any] = {}
        self._seen: list[set[str]] = [set() for _ in self.labelnames]
        self._warned = warned  # shared by a MetricSet: one warning per label
        self._lock = threading.Lock()

    def child(self, *values: str) -> t.Any:
        """The child for ``values`` (folded past the cap), created once."""
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

    def snapshot(self) -> list[Sample]:
        """Each child's value; histograms without observations are left out."""
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

    def fold(self) -> None:
        if self.kind == "histogram":
            for _, child in self.children():
                child.fold()


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
    for values, value in samples:
        value = t.cast(HistogramValue, value)
        buckets: list[t.Any] = []
        cumulative = 0.0
        rows = zip(family.bounds, value.counts, value.exemplars, strict=True)
        for bound, count, exemplar in rows:
            cumulative += count
            le = floatToGoString(bound)  # type: ignore[no-untyped-call]
            buckets.append((le, cumulative, exemplar) if exemplar else (le, cumulative))
        histogram.add_metric(values, buckets, value.sum)
    return histogram


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
        registry.register(_FamiliesCollector(self.families))
        _folder.watch(self)

    def reset(self) -> None:
        """Zero every value."""
        for family in self.families:
            family.reset()

    def new_locks(self) -> None:
        """In a forked child: new locks (a parent's thread may have held one at the fork)."""
        for family in self.families:
            family.new_locks()

    def fold(self) -> None:
        for family in self.families:
            family.fold()


class _FamiliesCollector(Collector):
    def __init__(self, families: Iterable[MetricFamily]) -> None:
        self._families = tuple(families)

    def collect(self) -> Iterable[t.Any]:
        for family in self._families:
            yield prometheus_family(family, family.snapshot())

    def describe(self) -> Iterable[t.Any]:
        # Names only, so the registry refuses a second collector of the same
        # names ("Duplicated timeseries") without collecting at register time.
        for family in self._families:
            if family.kind == "counter":
                yield CounterMetricFamily(family.name, family.documentation)
            else:
                yield HistogramMetricFamily(family.name, family.documentation)


class _Folder:
    """The process's daemon thread that folds every live MetricSet periodically."""

    def __init__(self) -> None:
        self._sets: weakref.WeakSet[MetricSet] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = 0  # the process whose thread runs

    def watch(self, metric_set: MetricSet) -> None:
        with self._lock:
            self._sets.add(metric_set)
            if self._pid != os.getpid():
                self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        threading.Thread(target=self._run, name="sigtrace-fold", daemon=True).start()

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(FOLD_INTERVAL)
            for metric_set in list(self._sets):
                try:
                    metric_set.fold()
                except Exception:  # pragma: no cover - folding only sorts and adds
                    log.debug("sigtrace: folding failed", exc_info=True)

    def after_fork_in_child(self) -> None:
        """The thread did not survive the fork: start one for this process."""
        self._lock = threading.Lock()
        self._pid = 0
        if len(self._sets):
            self._start()


_folder = _Folder()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_folder.after_fork_in_child)


_sets: weakref.WeakKeyDictionary[CollectorRegistry, MetricSet] = weakref.WeakKeyDictionary()
_sets_lock = threading.Lock()


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
