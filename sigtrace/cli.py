"""``flask sigtrace signals``: every signal this process knows, with its receivers.

Signals listed: Flask's own (``flask.signals``), those of blinker's
``default_namespace``, any signal sent since sigtrace instrumented the
process, and any other live signal that has receivers (custom namespaces,
anonymous class attributes), found by one scan of the garbage collector's
objects: fine for a one-off command, never done on a send. For each connected
receiver: its metric label, weak or strong, the
senders it is connected for and, when metrics are on, its calls, p50 / p99
latency and errors, read from this process's registry, or with
``PROMETHEUS_MULTIPROC_DIR`` set the totals over all workers (read through
:class:`sigtrace.multiprocess_directory.PublishedTotalsCollector`, writing nothing there).
sigtrace's own request timing uses Flask's hooks, not receivers, so it never
appears.

Latency quantiles are estimated from the histogram buckets exactly as
Prometheus' ``histogram_quantile`` does: linear interpolation inside the
bucket holding the rank, the highest finite bound when it falls in ``+Inf``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import types
import typing as t
from collections import defaultdict

import blinker
import click
import flask
import prometheus_client
from blinker import Signal
from flask import signals as flask_signals
from flask.cli import AppGroup
from prometheus_client import CollectorRegistry

from . import dispatch, multiprocess_directory, naming

__all__ = ["histogram_quantile", "sigtrace_cli", "signal_inventory"]

ANY_SENDER = "ANY"
UNKNOWN_SENDER = "?"
_RECEIVER_HISTOGRAM = "sigtrace_receiver_duration_seconds"
_RECEIVER_ERRORS = "sigtrace_receiver_errors_total"
_SIGNAL_SENDS = "sigtrace_signal_sends_total"
# Family names as collected: prometheus-client drops a counter's "_total".
_FAMILIES = frozenset(
    (
        _RECEIVER_HISTOGRAM,
        _RECEIVER_ERRORS.removesuffix("_total"),
        _SIGNAL_SENDS.removesuffix("_total"),
    )
)


@dataclasses.dataclass
class ReceiverRow:
    """One connected receiver and, when metrics are on, its statistics."""

    name: str
    ref: t.Literal["weak", "strong"]
    senders: list[str]
    calls: int | None = None
    p50_seconds: float | None = None
    p99_seconds: float | None = None
    errors: int | None = None


@dataclasses.dataclass
class SignalRow:
    """One signal, its send count (when metrics are on) and its receivers."""

    name: str
    sends: int | None
    receivers: list[ReceiverRow]


# --------------------------------------------------------------------------
# Which signals and receivers exist


def known_signals() -> list[Signal]:
    """Flask's signals, blinker's default namespace, every signal sent since
    instrumentation and every live signal with receivers, each once."""
    found: dict[int, Signal] = {}
    candidates: list[object] = [*vars(flask_signals).values()]
    candidates += list(blinker.default_namespace.values())
    candidates += [signal for signal, _ in dispatch.sent_signals()]
    candidates += _live_signals_with_receivers()
    for candidate in candidates:
        if isinstance(candidate, Signal):
            found.setdefault(id(candidate), candidate)
    return list(found.values())


def _live_signals_with_receivers() -> list[Signal]:
    """Every live ``Signal`` with receivers. ``type()`` rather than ``isinstance``:
    the heap holds mocks that claim to be signals and objects whose class
    attributes raise."""
    found: list[Signal] = []
    for obj in gc.get_objects():
        try:
            if issubclass(type(obj), Signal) and obj.receivers:
                found.append(obj)
        except Exception:
            continue
    return found


def _owner_name(signal: Signal) -> str:
    """The label a signal gets; for an anonymous one not sent yet, found through
    the objects that refer to it (a class attribute or a module global), as its
    first send would name it."""
    name = naming.signal_name(signal)
    if name != naming.ANONYMOUS_SIGNAL:
        return name
    for holder in gc.get_referrers(signal):
        if not isinstance(holder, dict):
            continue
        for owner in gc.get_referrers(holder):
            if isinstance(owner, type):
                for attr, value in vars(owner).items():
                    if value is signal:
                        return naming.clean_label(f"{owner.__module__}.{owner.__qualname__}.{attr}")
        module = holder.get("__name__")
        if isinstance(module, str) and "__builtins__" in holder:
            for attr, value in holder.items():
                if value is signal:
                    return naming.clean_label(f"{module}.{attr}")
    return name


def describe_sender(sender: object) -> str:
    """A short, safe description: never the sender's repr (it may be slow,
    raise, leak secrets or hold an address)."""
    if sender is blinker.ANY:
        return ANY_SENDER
    if sender is dispatch.UNKNOWN_SENDER:
        return UNKNOWN_SENDER
    if isinstance(sender, bool):
        return bool.__repr__(sender)
    if isinstance(sender, int):
        return int.__repr__(sender)  # an int subclass's own __str__ is not trusted
    if isinstance(sender, str):
        return naming.clean_label(json.dumps(sender, ensure_ascii=False))
    if isinstance(sender, type):
        return "class " + _type_name(sender)
    if isinstance(sender, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        return "function " + naming.receiver_name(sender)
    return _type_name(type(sender)) + " instance"


def _type_name(kind: type) -> str:
    return naming.clean_label(f"{kind.__module__}.{kind.__qualname__}")


# --------------------------------------------------------------------------
# Statistics from the registry


class _Stats:
    """sigtrace's per-receiver and per-signal samples, collected once."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.buckets: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
        self.errors: dict[tuple[str, str], float] = defaultdict(float)
        self.sends: dict[str, float] = {}
        for family in registry.collect():
            if family.name not in _FAMILIES:
                continue
            for s in family.samples:
                if s.name == _RECEIVER_HISTOGRAM + "_bucket":
                    key = (s.labels["signal"], s.labels["receiver"])
                    self.buckets[key].append((float(s.labels["le"]), float(s.value)))
                elif s.name == _RECEIVER_ERRORS:
                    self.errors[(s.labels["signal"], s.labels["receiver"])] += s.value
                elif s.name == _SIGNAL_SENDS:
                    self.sends[s.labels["signal"]] = float(s.value)

    def fill(self, signal: str, row: ReceiverRow) -> None:
        buckets = sorted(self.buckets.get((signal, row.name), ()))
        row.calls = int(buckets[-1][1]) if buckets else 0
        row.p50_seconds = histogram_quantile(0.5, buckets)
        row.p99_seconds = histogram_quantile(0.99, buckets)
        row.errors = int(self.errors.get((signal, row.name), 0))


def histogram_quantile(q: float, buckets: t.Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over ``(upper bound, cumulative count)``
    pairs sorted by bound and ending with ``+Inf``; None without observations."""
    if len(buckets) < 2 or buckets[-1][0] != math.inf or not 0 <= q <= 1:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    # Like Prometheus: the first bucket reaching the rank, else the +Inf one.
    index = next((i for i, (_, count) in enumerate(buckets) if count >= rank), len(buckets) - 1)
    upper, count = buckets[index]
    if upper == math.inf:
        return buckets[-2][0]  # in +Inf: the highest finite bound is the best guess
    lower, below = (0.0, 0.0) if index == 0 else buckets[index - 1]
    if index == 0 and upper <= 0:
        return upper
    in_bucket = count - below
    if in_bucket <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / in_bucket


# --------------------------------------------------------------------------
# The inventory and its two renderings


def signal_inventory(registry: CollectorRegistry | None, metrics: bool) -> list[SignalRow]:
    """Every known signal with its receivers, sorted by signal name."""
    stats = (
        _Stats(prometheus_client.REGISTRY if registry is None else registry) if metrics else None
    )
    rows: list[SignalRow] = []
    for signal in known_signals():
        name = dispatch.label_of(signal) or _owner_name(signal)
        receivers = []
        try:
            connected = dispatch.connections(signal)
        except Exception:  # a subclass whose receivers are not blinker's mapping
            connected = []
        for receiver, weak, senders in connected:
            row = ReceiverRow(
                naming.receiver_name(receiver),
                "weak" if weak else "strong",
                [describe_sender(sender) for sender in senders],
            )
            if stats is not None:
                stats.fill(name, row)
            receivers.append(row)
        sends = int(stats.sends.get(name, 0)) if stats is not None else None
        rows.append(SignalRow(name, sends, receivers))
    rows.sort(key=lambda row: row.name)
    return rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


QUANTILE_FOOTNOTE = (
    "* estimated from the histogram buckets (interpolated inside a bucket, as "
    "Prometheus' histogram_quantile does), not measured"
)


def render_table(rows: list[SignalRow], metrics: bool) -> str:
    """One aligned line per receiver (one per signal without receivers)."""
    header = ["SIGNAL", "RECEIVER", "REF", "SENDERS"]
    if metrics:
        header = [
            "SIGNAL",
            "SENDS",
            "RECEIVER",
            "REF",
            "SENDERS",
            "CALLS",
            "P50*",
            "P99*",
            "ERRORS",
        ]
    lines: list[list[str]] = [header]
    for signal in rows:
        receivers: list[ReceiverRow | None] = [*signal.receivers] or [None]
        for receiver in receivers:
            line = [signal.name]
            if metrics:
                line.append(str(signal.sends))
            if receiver is None:
                line += ["-", "-", "-"] + (["-"] * 4 if metrics else [])
            else:
                line += [receiver.name, receiver.ref, ", ".join(receiver.senders)]
                if metrics:
                    line += [
                        str(receiver.calls),
                        _duration(receiver.p50_seconds),
                        _duration(receiver.p99_seconds),
                        str(receiver.errors),
                    ]
            lines.append(line)
    numeric = {"SENDS", "CALLS", "P50*", "P99*", "ERRORS"}
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [
            cell.rjust(width) if header[i] in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    if metrics:
        out.append(QUANTILE_FOOTNOTE)
    return "\n".join(out)


def render_json(rows: list[SignalRow], metrics: bool, scope: str | None = None) -> str:
    """``{"metrics": bool, "scope": ..., "signals": [{name, sends, receivers: [...]}, ...]}``.

    ``scope`` (with metrics): ``"this-process"``, or ``"all-processes"`` under
    ``PROMETHEUS_MULTIPROC_DIR``.
    """
    document: dict[str, t.Any] = {"metrics": metrics}
    if scope is not None:
        document["scope"] = scope
    document["signals"] = [dataclasses.asdict(row) for row in rows]
    return json.dumps(document, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------
# The commands


@click.group("sigtrace", cls=AppGroup)
def sigtrace_cli() -> None:
    """Inspect sigtrace's view of this process's signals."""


@sigtrace_cli.command("signals")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def signals_command(as_json: bool) -> None:
    """List every known signal, its receivers and (with metrics) their stats.

    Stats are this process's own; with PROMETHEUS_MULTIPROC_DIR set, the
    totals over all workers that published there (what /metrics serves),
    read without writing anything into that directory.
    """
    state = flask.current_app.extensions.get("sigtrace")
    if state is None:
        raise click.ClickException("SigTrace is not initialised on this app")
    metrics = bool(state.settings.metrics)
    registry = state.ext.registry
    path = multiprocess_directory.directory() if metrics else None
    if path is not None:
        # Read-only: no publish, no archiving, no lock file. This process's
        # own sends are not published, so they are not in these totals.
        registry = CollectorRegistry()
        registry.register(multiprocess_directory.PublishedTotalsCollector(path, archive=False))
    rows = signal_inventory(registry, metrics)
    scope = "all-processes" if path is not None else "this-process"
    if as_json:
        click.echo(render_json(rows, metrics, scope if metrics else None))
        return
    if path is not None:
        click.echo(f"Totals over all processes publishing to PROMETHEUS_MULTIPROC_DIR={path}")
    click.echo(render_table(rows, metrics))
