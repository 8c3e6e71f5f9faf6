"""The multiprocess file format: one process's values, or the archive, as JSON.

Every file sigtrace writes into ``PROMETHEUS_MULTIPROC_DIR`` holds one JSON
object, a :class:`Document`. :mod:`sigtrace.multiprocess_directory` says where
the files live and how they are written, read and archived; this module only
says what is in one, checks it, and adds documents up.

Version 2 (:data:`FORMAT_VERSION`). A reader skips a document of any other
version. Fields, in the order they are written::

    Document
      format      int        FORMAT_VERSION
      kind        str        "process": one process's own values since it started
                             (file sigtrace-<pid>-<nonce>.json); "archive": the
                             sum of the process files it names (sigtrace-archive.json)
      pid         int|null   process: the writer's pid; archive: null
      run         int        the server run: the process group id of the writer
                             (a gunicorn or uWSGI master and its workers share it)
      generation  int        archive: incremented by every archiving pass; 0 in
                             a process document
      archived    [str]      archive: the process files whose values it holds
                             (readers skip those files); [] in a process document
      families    [Family]   only families with at least one series

    Family
      name        str        the Prometheus name, e.g. "sigtrace_signal_sends_total"
      help        str        its HELP text
      kind        str        "counter" or "histogram"
      labels      [str]      label names
      bounds      [str]      histogram: bucket upper bounds as Prometheus writes
                             them ("0.1", "+Inf"), ascending, the last "+Inf";
                             counter: []
      series      [Series]

    Series, counter:   {"labels": [str], "value": float}
    Series, histogram: {"labels": [str], "counts": [float], "sum": float,
                        "exemplars": [Exemplar|null]}
      labels      [str]      one value per label name
      value       float      the counter's total
      counts      [float]    observations per bucket (not cumulative), one per bound
      sum         float      the sum of the observations
      exemplars   [...]      per bucket, the latest exemplar or null

    Exemplar: {"labels": {str: str}, "value": float, "timestamp": float|null}

Every count, value and sum is finite and not negative (durations and counts);
:func:`parse` refuses anything else with :class:`FormatError`, so a file of
the wrong shape is skipped whole instead of breaking a scrape.

Version 1 (sigtrace 0.1) wrote series as positional lists; such a file is
reported as ``unsupported_format`` and skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
import typing as t
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from .metrics import cumulative_buckets

if t.TYPE_CHECKING:
    from .metrics import HistogramValue, MetricSet

__all__ = [
    "FORMAT_VERSION",
    "Document",
    "FormatError",
    "Totals",
    "encode",
    "parse",
    "document",
    "process_document",
    "run_id",
    "values_in",
]

FORMAT_VERSION = 2


class ExemplarDoc(t.TypedDict):
    labels: dict[str, str]
    value: float
    timestamp: float | None


class CounterSeries(t.TypedDict):
    labels: list[str]
    value: float


class HistogramSeries(t.TypedDict):
    labels: list[str]
    counts: list[float]
    sum: float
    exemplars: list[ExemplarDoc | None]


class Family(t.TypedDict):
    name: str
    help: str
    kind: t.Literal["counter", "histogram"]
    labels: list[str]
    bounds: list[str]
    series: list[t.Any]  # CounterSeries or HistogramSeries, by kind


class Document(t.TypedDict):
    format: int
    kind: t.Literal["process", "archive"]
    pid: int | None
    run: int
    generation: int
    archived: list[str]
    families: list[Family]


class FormatError(ValueError):
    """A file is not a valid document; ``reason`` is the errors metric's label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def run_id() -> int:
    """This server run: the process group, shared by a master and its workers."""
    return os.getpgrp()


def document(
    kind: t.Literal["process", "archive"],
    pid: int | None,
    families: list[Family],
    generation: int = 0,
    archived: list[str] | None = None,
) -> Document:
    """A document of this server run."""
    return Document(
        format=FORMAT_VERSION,
        kind=kind,
        pid=pid,
        run=run_id(),
        generation=generation,
        archived=archived or [],
        families=families,
    )


def process_document(metrics: MetricSet, pid: int) -> Document:
    """The values of process ``pid`` (tallied first; families with data only)."""
    families: list[Family] = []
    for family in metrics.families:
        series: list[t.Any] = []
        for values, value in family.tally_samples():
            if family.kind == "counter":
                series.append(CounterSeries(labels=list(values), value=float(t.cast(float, value))))
                continue
            value = t.cast("HistogramValue", value)
            series.append(
                HistogramSeries(
                    labels=list(values),
                    counts=[float(c) for c in value.counts],
                    sum=float(value.sum),
                    exemplars=[
                        None
                        if ex is None
                        else ExemplarDoc(
                            labels=dict(ex.labels),
                            value=ex.value,
                            timestamp=None if ex.timestamp is None else float(ex.timestamp),
                        )
                        for ex in value.exemplars
                    ],
                )
            )
        if series:
            bounds: list[str] = []
            if family.kind == "histogram":
                bounds = [floatToGoString(b) for b in family.bounds]  # type: ignore[no-untyped-call]
            families.append(
                Family(
                    name=family.name,
                    help=family.documentation,
                    kind=family.kind,
                    labels=list(family.labelnames),
                    bounds=bounds,
                    series=series,
                )
            )
    return document("process", pid, families)


def encode(document: Document) -> bytes:
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()


# --------------------------------------------------------------------------
# Checking a document read from a file. Hand-written: the schema is small and
# a validation library would be a new dependency for these few checks.


_NAME = re.compile(r"sigtrace_[a-zA-Z0-9_]+")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _fail(detail: str) -> t.NoReturn:
    raise FormatError("invalid_document", detail)


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(f"{where} is not a number")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        _fail(f"{where} is {number!r}: expected a finite number >= 0")
    return number


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(f"{where} is not a list of strings")
    return value


def _check_exemplar(value: object, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or set(value) != {"labels", "value", "timestamp"}:
        _fail(f"{where} is not an exemplar")
    labels = value["labels"]
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        _fail(f"{where}.labels is not a mapping of strings")
    _number(value["value"], f"{where}.value")
    if value["timestamp"] is not None:
        _number(value["timestamp"], f"{where}.timestamp")


def _check_family(family: object, index: int) -> None:
    where = f"families[{index}]"
    if not isinstance(family, dict) or set(family) != set(Family.__annotations__):
        _fail(f"{where} does not have the fields {sorted(Family.__annotations__)}")
    if not isinstance(family["name"], str) or not _NAME.fullmatch(family["name"]):
        _fail(f"{where}.name is not a sigtrace metric name")
    if not isinstance(family["help"], str):
        _fail(f"{where}.help is not a string")
    kind = family["kind"]
    if kind not in ("counter", "histogram"):
        _fail(f"{where}.kind is {kind!r}")
    labelnames = _strings(family["labels"], f"{where}.labels")
    if not all(_LABEL.fullmatch(n) for n in labelnames) or "le" in labelnames:
        _fail(f"{where}.labels holds a name Prometheus does not accept")
    width = len(labelnames)
    bounds = _strings(family["bounds"], f"{where}.bounds")
    if kind == "histogram":
        try:
            floats = [float(b) for b in bounds]
        except ValueError:
            _fail(f"{where}.bounds holds a value that is not a number")
        if not floats or floats[-1] != math.inf or floats != sorted(set(floats)):
            _fail(f"{where}.bounds is not ascending up to +Inf")
    if not isinstance(family["series"], list):
        _fail(f"{where}.series is not a list")
    fields = {"labels", "value"} if kind == "counter" else set(HistogramSeries.__annotations__)
    for position, series in enumerate(family["series"]):
        at = f"{where}.series[{position}]"
        if not isinstance(series, dict) or set(series) != fields:
            _fail(f"{at} does not have the fields {sorted(fields)}")
        if len(_strings(series["labels"], f"{at}.labels")) != width:
            _fail(f"{at}.labels has not one value per label name")
        if kind == "counter":
            _number(series["value"], f"{at}.value")
            continue
        counts, exemplars = series["counts"], series["exemplars"]
        if not (isinstance(counts, list) and isinstance(exemplars, list)) or not (
            len(counts) == len(exemplars) == len(bounds)
        ):
            _fail(f"{at} has not one count and one exemplar per bound")
        for i, count in enumerate(counts):
            _number(count, f"{at}.counts[{i}]")
        for i, exemplar in enumerate(exemplars):
            _check_exemplar(exemplar, f"{at}.exemplars[{i}]")
        _number(series["sum"], f"{at}.sum")


def parse(data: bytes, kind: t.Literal["process", "archive"]) -> Document:
    """The document in ``data``, checked field by field; :class:`FormatError` if invalid."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise FormatError("invalid_json", f"not JSON: {error}") from None
    if not isinstance(document, dict):
        _fail("not a JSON object")
    if document.get("format") != FORMAT_VERSION:
        raise FormatError(
            "unsupported_format",
            f"format {document.get('format')!r}, this sigtrace reads {FORMAT_VERSION}",
        )
    if set(document) != set(Document.__annotations__):
        _fail(f"does not have the fields {sorted(Document.__annotations__)}")
    if document["kind"] != kind:
        _fail(f"kind is {document['kind']!r}, expected {kind!r}")
    for field in ("run", "generation"):
        if isinstance(document[field], bool) or not isinstance(document[field], int):
            _fail(f"{field} is not an integer")
    _strings(document["archived"], "archived")
    if not isinstance(document["families"], list):
        _fail("families is not a list")
    for index, family in enumerate(document["families"]):
        _check_family(family, index)
    return t.cast(Document, document)


def values_in(document: Document) -> float:
    """How many values a document holds: counter totals plus observations.

    Both only grow in one process's successive documents.
    """
    total = 0.0
    for family in document["families"]:
        for series in family["series"]:
            total += series["value"] if family["kind"] == "counter" else sum(series["counts"])
    return total


# --------------------------------------------------------------------------
# Adding documents up


Labels = tuple[str, ...]


class _HistogramTotal:
    __slots__ = ("counts", "exemplars", "sum")

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}  # by bound ("le")
        self.sum = 0.0
        self.exemplars: dict[str, ExemplarDoc] = {}  # the freshest, by bound


class _FamilyTotal:
    __slots__ = ("documentation", "kind", "labelnames", "series")

    def __init__(self, documentation: str, kind: str, labelnames: list[str]) -> None:
        self.documentation = documentation
        self.kind = kind
        self.labelnames = labelnames
        self.series: dict[Labels, t.Any] = {}  # float (counter) or _HistogramTotal


class Totals:
    """The sum of documents: counters and buckets added, the freshest exemplar kept."""

    def __init__(self) -> None:
        self.families: dict[str, _FamilyTotal] = {}

    def add(self, document: Document) -> None:
        for family in document["families"]:
            found = self.families.get(family["name"])
            if found is None:
                found = _FamilyTotal(family["help"], family["kind"], family["labels"])
                self.families[family["name"]] = found
            if found.kind != family["kind"]:
                continue  # a family of the same name and another kind: not mixed in
            for series in family["series"]:
                key = tuple(series["labels"])
                if found.kind == "counter":
                    found.series[key] = found.series.get(key, 0.0) + series["value"]
                    continue
                held = found.series.get(key)
                if held is None:
                    held = found.series[key] = _HistogramTotal()
                held.sum += series["sum"]
                rows = zip(family["bounds"], series["counts"], series["exemplars"], strict=True)
                for le, count, exemplar in rows:
                    held.counts[le] = held.counts.get(le, 0.0) + count
                    if exemplar is not None:
                        previous = held.exemplars.get(le)
                        if previous is None or (exemplar["timestamp"] or 0.0) >= (
                            previous["timestamp"] or 0.0
                        ):
                            held.exemplars[le] = exemplar

    def archive(self, archived: list[str], generation: int) -> Document:
        """These totals as an archive document."""
        families: list[Family] = []
        for name, family in self.families.items():
            series: list[t.Any] = []
            bounds: list[str] = []
            if family.kind == "histogram":
                les = {le for total in family.series.values() for le in total.counts}
                bounds = sorted(les, key=float)
            for key, value in family.series.items():
                if family.kind == "counter":
                    series.append(CounterSeries(labels=list(key), value=value))
                    continue
                series.append(
                    HistogramSeries(
                        labels=list(key),
                        counts=[value.counts.get(le, 0.0) for le in bounds],
                        sum=value.sum,
                        exemplars=[value.exemplars.get(le) for le in bounds],
                    )
                )
            families.append(
                Family(
                    name=name,
                    help=family.documentation,
                    kind=t.cast(t.Literal["counter", "histogram"], family.kind),
                    labels=family.labelnames,
                    bounds=bounds,
                    series=series,
                )
            )
        return document("archive", None, families, generation, sorted(archived))

    def metric_families(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        """Prometheus families; histograms without observations are left out."""
        for name, family in self.families.items():
            if family.kind == "counter":
                counter = CounterMetricFamily(name, family.documentation, labels=family.labelnames)
                for key, value in family.series.items():
                    counter.add_metric(list(key), value)
                yield counter
                continue
            histogram = HistogramMetricFamily(name, family.documentation, labels=family.labelnames)
            for key, total in family.series.items():
                if not any(total.counts.values()):
                    continue
                rows = []
                for le in sorted(total.counts, key=float):
                    held = total.exemplars.get(le)
                    exemplar = None
                    if held is not None:
                        exemplar = Exemplar(held["labels"], held["value"], held["timestamp"])
                    rows.append((le, total.counts[le], exemplar))
                histogram.add_metric(list(key), cumulative_buckets(rows), total.sum)
            yield histogram
