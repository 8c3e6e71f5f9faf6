"""The signals page (``SIGTRACE_UI``): the signal map, receivers, slow sends, endpoints.

Everything the page shows is read when the page asks for it, from what sigtrace
already records; nothing is added to a send:

* the signal map, the receivers table and the endpoints come from the metric
  families that ``/metrics`` serves (one process's snapshots, or under
  ``PROMETHEUS_MULTIPROC_DIR`` the merge of every worker's published files,
  read by :func:`metric_families`), plus the receivers connected in the
  serving process, called or not (the inventory of ``flask sigtrace signals``);
* the slowest recent sends come from the spans sigtrace already makes:
  :class:`SlowSends`, a span processor on the tracer provider, keeps the
  signal spans over ``SIGTRACE_SLOW_THRESHOLD`` or failed, each with its
  receiver spans, in a bounded ring. They are the serving process's own.

The page is static HTML, CSS and JavaScript shipped as package data in
``sigtrace/ui/static`` and served by the app itself: no CDN, no build step. It
fetches ``<path>/data.json`` every few seconds and draws with the DOM and SVG.
"""

from __future__ import annotations

import collections
import html
import importlib.resources
import itertools
import json
import math
import os
import time
import typing as t
import weakref
from collections.abc import Iterable, Iterator

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import StatusCode

from .. import lifecycle, multiprocess_directory, tracing
from ..cli import histogram_quantile, signal_inventory
from ..faults import internal_error
from ..metrics import HistogramValue, MetricSet

__all__ = ["COMPONENT", "RECENT_SENDS", "Dashboard", "SlowSends", "metric_families", "slow_sends"]

RECENT_SENDS = 50
"""How many slow or failed sends the ring keeps (the newest)."""

REFRESH_SECONDS = 5
"""How often the page asks for new data."""

_STAGED_RECEIVER_SPANS = 1024
"""Receiver spans remembered (a ring) until their signal span ends."""

_INVENTORY_TTL = 10.0
"""Seconds the list of connected receivers is reused (it scans the heap once)."""

_ASSETS = {
    "ui.js": "text/javascript; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
}
_HEADERS = (
    # Defence in depth: names are always inserted as text, and even so no
    # script but ours and no inline script may run on the page.
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
)

_RECEIVER_HISTOGRAM = "sigtrace_receiver_duration_seconds"
_RECEIVER_ERRORS = "sigtrace_receiver_errors_total"
_SIGNAL_SENDS = "sigtrace_signal_sends_total"
_HTTP_HISTOGRAM = "sigtrace_http_request_duration_seconds"
_HTTP_EXCEPTIONS = "sigtrace_http_request_exceptions_total"


# --------------------------------------------------------------------------
# Slow sends, from the spans


_Staged = tuple[int, int, int, str, "str | None"]
"""What a receiver span leaves in the staging ring: its parent's span id, start
and end (ns), receiver name and error. Not the span: the ring must not keep
1,024 spans and their attributes alive."""

_ERROR = StatusCode.ERROR  # once: looking an Enum member up is slow on Python 3.11
_RECEIVER_PREFIX = "receiver "
_SIGNAL_PREFIX = "signal "


class SlowSends(SpanProcessor):
    """Keeps the last :data:`RECENT_SENDS` signal spans over the threshold or failed.

    ``on_end`` sees every span of the provider. A receiver span of sigtrace's
    leaves its parent's id, times, name and error in a bounded staging ring; a
    signal span is dropped at once unless it is slow or failed, and only then
    are its receivers looked up in the staging ring and the send written to the
    ring of recent sends. The ring is this process's: under several workers
    each keeps its own.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold_ns = int(threshold * 1e9)
        self._staged: collections.deque[_Staged] = collections.deque(maxlen=_STAGED_RECEIVER_SPANS)
        self._sends: collections.deque[dict[str, t.Any]] = collections.deque(maxlen=RECENT_SENDS)

    def on_start(self, span: t.Any, parent_context: t.Any = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        # Every span of the provider passes here, so this reads the SDK span's
        # fields directly: its public properties are a Python call each (about
        # 2,000 instructions apiece under CPython 3.11), and ``.attributes``
        # copies. Should the SDK rename them, the AttributeError is reported
        # once by internal_error and the page lists no slow sends; the app is
        # untouched (tests/test_ui.py would fail).
        try:
            name: str = span._name
            receiver = name.startswith(_RECEIVER_PREFIX)
            if not receiver and not name.startswith(_SIGNAL_PREFIX):
                return
            scope = span._instrumentation_scope
            if scope is None or scope._name != tracing.TRACER_NAME:
                return
            started: int = span._start_time or 0
            ended: int = span._end_time or 0
            failed = span._status._status_code is _ERROR
            if receiver:  # its send may turn out slow
                parent = span._parent  # a SpanContext: a tuple whose [1] is the span id
                self._staged.append(
                    (
                        parent[1] if parent is not None else 0,
                        started,
                        ended,
                        name[len(_RECEIVER_PREFIX) :],
                        _error_of(span) if failed else None,
                    )
                )
            elif failed or ended - started > self.threshold_ns:
                self._sends.append(self._send(span, started, ended, failed))
        except Exception:
            internal_error("ui slow sends")

    def _send(self, span: ReadableSpan, started: int, ended: int, failed: bool) -> dict[str, t.Any]:
        attributes = span.attributes or {}
        context = span.get_span_context()
        span_id = context.span_id if context is not None else 0
        expected = attributes.get(tracing.ATTR_RECEIVERS_CALLED)
        wanted = expected if isinstance(expected, int) else _STAGED_RECEIVER_SPANS
        children = self._children(span_id, wanted)
        receivers = [
            {
                "name": receiver,
                "start": (start - started) / 1e9,
                "seconds": (end - start) / 1e9,
                "error": error,
            }
            for _, start, end, receiver, error in sorted(children, key=lambda c: c[1])
        ]
        return {
            "signal": str(attributes.get(tracing.ATTR_SIGNAL_NAME, span.name)),
            "trace_id": format(context.trace_id, "032x") if context is not None else "",
            "at": started / 1e9,
            "seconds": (ended - started) / 1e9,
            "error": _error_of(span) if failed else None,
            "receivers": receivers,
            "receivers_called": expected if isinstance(expected, int) else len(receivers),
            "pid": os.getpid(),
        }

    def _children(self, span_id: int, wanted: int) -> list[_Staged]:
        """The staged receiver spans of ``span_id``, newest first: they ended just
        before their signal span, so the walk back usually stops after a few."""
        for ring in (self._staged, list(self._staged)):
            children: list[_Staged] = []
            try:
                for staged in reversed(ring):
                    if staged[0] == span_id:
                        children.append(staged)
                        if len(children) >= wanted:
                            break
            except RuntimeError:  # another thread's span changed the ring: walk a copy
                continue
            return children
        return []  # pragma: no cover - a list copy does not change

    def recent(self) -> list[dict[str, t.Any]]:
        return list(self._sends)

    def clear(self) -> None:
        self._sends.clear()
        self._staged.clear()

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _error_of(span: ReadableSpan) -> str | None:
    if span.status.status_code is not _ERROR:
        return None
    kind = (span.attributes or {}).get(tracing.ERROR_TYPE)
    return str(kind) if kind else "error"


# One processor per tracer provider (the SDK cannot remove a processor).
_processors: weakref.WeakKeyDictionary[t.Any, SlowSends] = weakref.WeakKeyDictionary()
_processors_lock = lifecycle.ForkSafeLock()  # a forked child gets a new one


def slow_sends(provider: t.Any, threshold: float) -> SlowSends | None:
    """The :class:`SlowSends` of ``provider`` (the global one if None), added on
    first use; None when the provider is not the SDK's (spans are not recorded)."""
    provider = trace.get_tracer_provider() if provider is None else provider
    if not callable(getattr(provider, "add_span_processor", None)):
        return None
    with _processors_lock:
        found = _processors.get(provider)
        if found is None:
            found = _processors[provider] = SlowSends(threshold)
            provider.add_span_processor(found)
        found.threshold_ns = int(threshold * 1e9)
        return found


def _forget_parent_sends() -> None:
    for processor in list(_processors.values()):
        processor.clear()


COMPONENT = lifecycle.Component(
    "sigtrace-ui", lifecycle.Order.TRACING, after_fork_in_child=_forget_parent_sends
)
"""While a page is served: a forked worker shows its own sends, not its master's."""


# --------------------------------------------------------------------------
# Statistics, from the same metric families as /metrics


def metric_families(path: str) -> Iterable[t.Any]:
    """Every worker's sigtrace metric families merged, as ``/metrics`` serves them
    under ``PROMETHEUS_MULTIPROC_DIR``: the same collector a scrape uses (which
    publishes this process's own values first). The page's one read of the
    multiprocess directory."""
    from ..exposition import published_totals

    return published_totals(path).collect()


Buckets = list[tuple[float, float]]  # (upper bound, cumulative count), ending with +Inf
Series = tuple[str, dict[str, str], "float | Buckets"]  # family, labels, total or buckets


def _series(metrics: MetricSet | None) -> Iterator[Series]:
    """sigtrace's series with the values ``/metrics`` shows: one process's own
    snapshots, or with ``PROMETHEUS_MULTIPROC_DIR`` set every worker's merged."""
    path = multiprocess_directory.directory()
    if path is not None:
        yield from _parsed(metric_families(path))
        return
    if metrics is None:
        return
    for family in metrics.families:  # straight from the snapshots: no sample objects
        for values, value in family.tally_samples():
            labels = dict(zip(family.labelnames, values, strict=True))
            if isinstance(value, HistogramValue):
                cumulative = list(itertools.accumulate(value.counts))
                yield family.name, labels, list(zip(family.bounds, cumulative, strict=True))
            else:
                yield family.name, labels, float(value)


def _parsed(families: Iterable[t.Any]) -> Iterator[Series]:
    """prometheus-client families as series (a counter family's name keeps ``_total``)."""
    for family in families:
        buckets: dict[tuple[tuple[str, str], ...], Buckets] = {}
        for s in family.samples:
            if s.name == family.name + "_bucket":
                labels = tuple((k, v) for k, v in s.labels.items() if k != "le")
                buckets.setdefault(labels, []).append((float(s.labels["le"]), float(s.value)))
            elif s.name == family.name + "_total":
                yield s.name, dict(s.labels), float(s.value)
        for labels, pairs in buckets.items():
            yield family.name, dict(labels), sorted(pairs)


class _Stats:
    """The series the page needs, collected once per request."""

    def __init__(self, series: Iterable[Series]) -> None:
        self.receivers: dict[tuple[str, str], Buckets] = {}
        self.errors: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.sends: dict[str, float] = {}
        self.http: dict[tuple[str, str], dict[float, float]] = collections.defaultdict(dict)
        self.http_5xx: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.exceptions: dict[tuple[str, str], dict[str, float]] = collections.defaultdict(dict)
        for name, labels, value in series:
            if name == _RECEIVER_HISTOGRAM:
                self.receivers[(labels["signal"], labels["receiver"])] = t.cast(Buckets, value)
            elif name == _RECEIVER_ERRORS:
                self.errors[(labels["signal"], labels["receiver"])] += t.cast(float, value)
            elif name == _SIGNAL_SENDS:
                self.sends[labels["signal"]] = t.cast(float, value)
            elif name == _HTTP_HISTOGRAM:
                key = (labels["method"], labels["endpoint"])
                merged = self.http[key]  # all statuses together
                for bound, count in t.cast(Buckets, value):
                    merged[bound] = merged.get(bound, 0.0) + count
                if labels["status"].startswith("5"):
                    self.http_5xx[key] += t.cast(Buckets, value)[-1][1]
            elif name == _HTTP_EXCEPTIONS:
                found = self.exceptions[(labels["method"], labels["endpoint"])]
                kind = labels["exception"]
                found[kind] = found.get(kind, 0.0) + t.cast(float, value)


def _latency(pairs: Buckets | None) -> dict[str, t.Any]:
    """Calls and p50/p95/p99 estimated from cumulative buckets (as Prometheus does)."""
    pairs = pairs or []
    calls = pairs[-1][1] if pairs else 0.0
    return {
        "calls": int(calls),
        **{
            name: _finite(histogram_quantile(q, pairs))
            for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
        },
    }


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# --------------------------------------------------------------------------
# The page


class Dashboard:
    """What one app's page serves: the page, its assets and its data."""

    def __init__(
        self,
        *,
        path: str,
        app_name: str,
        metrics: MetricSet | None,
        tracer_provider: t.Any,
        tracing_enabled: bool,
        slow_threshold: float,
        trace_url: str | None,
    ) -> None:
        self.path = path
        self.app_name = app_name
        self.metrics = metrics
        self.tracer_provider = tracer_provider
        self.tracing_enabled = tracing_enabled
        self.slow_threshold = slow_threshold
        self.trace_url = trace_url
        self._sends = slow_sends(tracer_provider, slow_threshold) if tracing_enabled else None
        self._inventory: tuple[float, list[t.Any]] | None = None
        self._lock = lifecycle.ForkSafeLock()  # a page request may hold it at a fork

    def respond(self, subpath: str, script_root: str) -> tuple[int, bytes, list[tuple[str, str]]]:
        """``(status, body, headers)`` for ``subpath`` below the page's path (``""``:
        the page); ``script_root`` is where the app is mounted (WSGI ``SCRIPT_NAME``)."""
        status, content_type, body = self._respond(subpath, script_root + self.path)
        return status, body, [("Content-Type", content_type), *_HEADERS]

    def _respond(self, subpath: str, base: str) -> tuple[int, str, bytes]:
        if subpath in ("", "/"):
            page = _asset("index.html").decode()
            body = page.replace("{{base}}", html.escape(base, quote=True)).encode()
            return 200, "text/html; charset=utf-8", body
        if subpath == "/data.json":
            data = json.dumps(self.data(), separators=(",", ":"), allow_nan=False)
            return 200, "application/json", data.encode()
        name = subpath.lstrip("/")
        if name in _ASSETS:
            return 200, _ASSETS[name], _asset(name)
        return 404, "text/plain; charset=utf-8", b"not found\n"

    def _connected(self) -> list[t.Any]:
        """The serving process's signals and connected receivers, reused a few seconds."""
        with self._lock:
            now = time.monotonic()
            if self._inventory is None or now - self._inventory[0] > _INVENTORY_TTL:
                try:
                    self._inventory = (now, signal_inventory(None, metrics=False))
                except Exception:
                    internal_error("ui inventory")  # the page shows what the metrics have
                    self._inventory = (now, [])
            return self._inventory[1]

    def data(self) -> dict[str, t.Any]:
        """Everything the page shows, as JSON-ready values."""
        stats = _Stats(_series(self.metrics))
        signals: dict[str, dict[str, t.Any]] = {}

        def signal(name: str) -> dict[str, t.Any]:
            found = signals.get(name)
            if found is None:
                found = signals[name] = {"name": name, "sends": 0, "receivers": {}}
            return found

        for row in self._connected():
            entry = signal(row.name)
            for receiver in row.receivers:
                entry["receivers"].setdefault(receiver.name, {"connected": True})
        for signal_name, receiver_name in (*stats.receivers, *stats.errors):
            signal(signal_name)["receivers"].setdefault(receiver_name, {"connected": False})
        for signal_name, sends in stats.sends.items():
            signal(signal_name)["sends"] = int(sends)
        for entry in signals.values():
            rows = []
            for receiver_name, row in entry["receivers"].items():
                key = (entry["name"], receiver_name)
                rows.append(
                    {
                        "name": receiver_name,
                        "connected": row["connected"],
                        **_latency(stats.receivers.get(key)),
                        "errors": int(stats.errors.get(key, 0.0)),
                    }
                )
            entry["receivers"] = rows
        endpoints = []
        for key in sorted({*stats.http, *stats.exceptions}):
            exceptions = stats.exceptions.get(key, {})
            endpoints.append(
                {
                    "method": key[0],
                    "endpoint": key[1],
                    **_latency(sorted(stats.http.get(key, {}).items())),
                    "errors": int(stats.http_5xx.get(key, 0.0)),
                    "exceptions": [
                        {"name": name, "count": int(count)}
                        for name, count in sorted(exceptions.items(), key=lambda kv: -kv[1])
                    ],
                }
            )
        if self._sends is None and self.tracing_enabled:
            self._sends = slow_sends(self.tracer_provider, self.slow_threshold)
        path = multiprocess_directory.directory()
        return {
            "app": self.app_name,
            "pid": os.getpid(),
            "time": time.time(),
            "refresh": REFRESH_SECONDS,
            "metrics": self.metrics is not None or path is not None,
            "merged": path is not None,
            "slow_threshold": self.slow_threshold,
            "trace_url": self.trace_url,
            "recording": self._sends is not None,
            "signals": sorted(signals.values(), key=lambda s: s["name"]),
            "endpoints": endpoints,
            "recent": self._sends.recent() if self._sends is not None else [],
        }


def _asset(name: str) -> bytes:
    return importlib.resources.files(__package__).joinpath("static", name).read_bytes()
