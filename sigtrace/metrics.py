"""Metric families, pre-bound label children and their two storage backends.

The traced send only ever calls ``child.inc()``, ``child.observe(v, ex)`` or
(single process) ``child.add(v)`` on children bound once per (signal,
receiver) and cached, never ``labels()``.

Two backends give the children those methods:

* single process (the default): sigtrace's own lock-free children, exposed by
  one :class:`prometheus_client.registry.Collector` per registry. Written by
  hand because prometheus-client takes a lock per increment (about 0.5 µs here,
  1.2 µs per histogram observe), which would be most of sigtrace's budget. A
  counter is an ``itertools.count`` (``next()`` is one atomic C call); a
  histogram is ``sigtrace._speedups.Histogram`` (C, one call per observation,
  atomic under the GIL) or, where that extension was not built, a pure-Python
  core with one row of bucket counts per thread, summed at scrape time.
* multiprocess (``PROMETHEUS_MULTIPROC_DIR`` set): prometheus-client's own
  Counter and Histogram, whose values live in the shared mmap files that
  :class:`prometheus_client.multiprocess.MultiProcessCollector` aggregates.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import typing as t
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Sequence

import prometheus_client
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

__all__ = [
    "DEFAULT_BUCKETS",
    "SPEEDUPS",
    "DEFAULT_MAX_LABEL_VALUES",
    "OVERFLOW_VALUE",
    "Family",
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

INF = float("inf")


def multiprocess_mode() -> bool:
    """True when prometheus-client's multiprocess mode is configured."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class FastCounter:
    """A monotonic counter incremented by one without a lock."""

    __slots__ = ("_count", "inc")

    def __init__(self) -> None:
        self._count = itertools.count()
        # The bound C method itself: calling it is the whole increment.
        self.inc: t.Callable[[], object] = self._count.__next__

    def get(self) -> float:
        # itertools.count reveals its next value only through its repr.
        return float(repr(self._count)[6:-1])


class PyHistogramCore:
    """Bucket counts and a sum without a lock: one row per writing thread.

    The pure-Python twin of ``sigtrace._speedups.Histogram`` (same ``add`` and
    ``snapshot``), used when the C extension was not built. A row is written
    only by its thread and summed at scrape time.
    """

    __slots__ = ("_bounds", "_local", "_lock", "_retired", "_rows")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = tuple(bounds)  # ends with +Inf
        self._local = threading.local()
        self._rows: list[tuple[weakref.ref[threading.Thread], list[float]]] = []
        self._retired = [0.0] * (len(self._bounds) + 1)  # folded rows of dead threads
        self._lock = threading.Lock()

    def add(self, amount: float) -> int:
        """Count one observation; return its bucket's index."""
        try:
            row: list[float] = self._local.row
        except AttributeError:
            row = self._new_row()
        index = bisect_left(self._bounds, amount)
        row[index] += 1
        row[-1] += amount
        return index

    def _new_row(self) -> list[float]:
        row = [0.0] * (len(self._bounds) + 1)
        self._local.row = row
        with self._lock:
            self._fold_dead_rows()
            self._rows.append((weakref.ref(threading.current_thread()), row))
        return row

    def _fold_dead_rows(self) -> None:
        alive = []
        for thread_ref, row in self._rows:
            thread = thread_ref()
            if thread is None or not thread.is_alive():
                for i, value in enumerate(row):
                    self._retired[i] += value
            else:
                alive.append((thread_ref, row))
        self._rows = alive

    def snapshot(self) -> tuple[list[float], float]:
        """Per-bucket (non-cumulative) counts and the sum, over all threads."""
        with self._lock:
            self._fold_dead_rows()
            totals = list(self._retired)
            for _, row in self._rows:
                for i, value in enumerate(row):
                    totals[i] += value
        return totals[:-1], totals[-1]


class HistogramCore(t.Protocol):
    def add(self, amount: float, /) -> int: ...
    def snapshot(self) -> tuple[list[float], float]: ...


HistogramCoreType = t.Callable[[Sequence[float]], HistogramCore]

_core_type: HistogramCoreType
try:
    from ._speedups import Histogram as _CHistogram
except ImportError:  # built without a C compiler
    _core_type = PyHistogramCore
    SPEEDUPS = False
else:
    _core_type = _CHistogram
    SPEEDUPS = True
"""True when histograms use the C extension ``sigtrace._speedups``."""


class FastHistogram:
    """A pre-bound histogram child: C core when built, else :class:`PyHistogramCore`.

    ``add(amount)`` is the core's own method (the hot path calls it directly);
    ``observe(amount, exemplar)`` adds the exemplar, as prometheus-client's does.
    """

    __slots__ = ("_exemplars", "add", "snapshot")

    def __init__(self, bounds: Sequence[float], core: HistogramCoreType | None = None) -> None:
        built = (core or _core_type)(bounds)
        self.add: t.Callable[[float], int] = built.add
        self.snapshot: t.Callable[[], tuple[list[float], float]] = built.snapshot
        self._exemplars: list[Exemplar | None] = [None] * len(bounds)

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        index = self.add(amount)
        if exemplar is not None:
            self._exemplars[index] = Exemplar(exemplar, amount, time.time())


class Family:
    """One metric family: cached children by label values, with a cardinality cap."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        kind: t.Literal["counter", "histogram"],
        buckets: Sequence[float],
        max_label_values: int,
        registry: CollectorRegistry,
        multiprocess: bool,
        warned: set[str] | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.kind = kind
        self.bounds = (*sorted(set(buckets)), INF)
        self.max_label_values = max_label_values
        # capped values -> child; values folded past the cap are not keys (they
        # are unbounded) and take the locked path to the overflow child.
        self._children: dict[tuple[str, ...], t.Any] = {}
        self._seen: list[set[str]] = [set() for _ in self.labelnames]
        self._warned: set[str] = set() if warned is None else warned  # shared: one warning a label
        self._lock = threading.Lock()
        self._client: t.Any = None
        if multiprocess:
            if kind == "counter":
                self._client = prometheus_client.Counter(
                    name.removesuffix("_total"), documentation, self.labelnames,
                    registry=registry,
                )  # fmt: skip
            else:
                self._client = prometheus_client.Histogram(
                    name, documentation, self.labelnames,
                    buckets=self.bounds, registry=registry,
                )  # fmt: skip

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

    def _make_child(self, values: tuple[str, ...]) -> t.Any:
        if self._client is not None:
            return self._client.labels(*values)
        if self.kind == "counter":
            return FastCounter()
        return FastHistogram(self.bounds)

    def collect(self) -> CounterMetricFamily | HistogramMetricFamily:
        """The family's current samples (single-process backend only)."""
        with self._lock:
            items = list(self._children.items())
        if self.kind == "counter":
            counter = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for values, child in items:
                counter.add_metric(values, child.get())
            return counter
        histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in items:
            counts, total = child.snapshot()
            buckets: list[t.Any] = []
            cumulative = 0.0
            for bound, count, exemplar in zip(self.bounds, counts, child._exemplars, strict=True):
                cumulative += count
                le = floatToGoString(bound)  # type: ignore[no-untyped-call]
                buckets.append((le, cumulative, exemplar) if exemplar else (le, cumulative))
            histogram.add_metric(values, buckets, total)
        return histogram


class MetricSet:
    """All sigtrace families of one registry, created once (no duplicates)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        max_label_values: int = DEFAULT_MAX_LABEL_VALUES,
    ) -> None:
        self.multiprocess = multiprocess_mode()
        warned: set[str] = set()

        def family(
            name: str, doc: str, labels: Sequence[str], kind: t.Literal["counter", "histogram"]
        ) -> Family:
            return Family(
                name, doc, labels, kind, buckets, max_label_values, registry, self.multiprocess,
                warned,
            )  # fmt: skip

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
            "Flask requests from request_started to request_finished.",
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
        if not self.multiprocess:
            registry.register(_FamiliesCollector(self.families))


class _FamiliesCollector(Collector):
    def __init__(self, families: Iterable[Family]) -> None:
        self._families = tuple(families)

    def collect(self) -> Iterable[t.Any]:
        for family in self._families:
            yield family.collect()

    def describe(self) -> Iterable[t.Any]:
        # Names only, so the registry refuses a second collector of the same
        # names ("Duplicated timeseries") without collecting at register time.
        for family in self._families:
            if family.kind == "counter":
                yield CounterMetricFamily(family.name, family.documentation)
            else:
                yield HistogramMetricFamily(family.name, family.documentation)


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
