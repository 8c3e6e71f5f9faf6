"""What the traced send records, bound once per signal and per receiver.

A :class:`SignalBinding` is made at a signal's first send: its label, whether
it is recorded, its metric children, span name and attributes. Each receiver is bound once to a
:class:`ReceiverBinding` and cached by identity, so the send does one dict
lookup per receiver and gets, in one tuple, the binding, whether the receiver
is a coroutine function and the C method that records its duration.

Everything here that records swallows its own faults through
:func:`~sigtrace.faults.internal_error`: a broken metric backend costs the
recording, never the send.
"""

from __future__ import annotations

import fnmatch
import types
import typing as t
import weakref
from collections.abc import Callable, Iterable

from . import naming, tracing
from .faults import internal_error
from .identity import IdentityCache
from .metrics import CounterChild, HistogramChild, MetricSet

__all__ = [
    "ReceiverBinding",
    "SignalBinding",
    "exemplar_of",
    "records_signal",
]


def _ignore(_value: object = None) -> None:
    return None


def _safe(method: Callable[..., t.Any], where: str) -> Callable[..., t.Any]:
    """``method`` itself when it is the C method of sigtrace's own values, else guarded.

    The send calls these without a ``try``: a list's ``append`` and an
    ``itertools.count``'s ``__next__`` cannot fail, anything else might.
    """
    owner = getattr(method, "__self__", None)
    if isinstance(method, _C_METHODS) and type(owner) in (list, _count_type):
        return method

    def guarded(*args: t.Any) -> None:
        try:
            method(*args)
        except Exception:
            internal_error(where)

    return guarded


_count_type = type(CounterChild()._count)
_C_METHODS = (types.BuiltinMethodType, types.MethodWrapperType)


def _ignore_exemplar(_elapsed: float, _exemplar: dict[str, str]) -> None:
    return None


def _exemplifier(duration: HistogramChild | None) -> Callable[[float, dict[str, str]], None]:
    """``exemplify(elapsed, exemplar)``: links a recorded duration to a span. It may
    raise (a broken metric backend): the spans that call it guard it."""
    return duration.exemplify if duration is not None else _ignore_exemplar


def records_signal(name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    """Whether the include/exclude patterns let signal ``name`` be recorded."""
    include = tuple(include)
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


# The last span asked for and its exemplar: a request's span is asked twice, by the
# sends under it and when it ends. A span's context never changes, and holding the
# span keeps its identity from being reused, so the pair stays right.
_last_exemplar: tuple[t.Any, dict[str, str] | None] = (None, None)


def exemplar_of(span: t.Any) -> dict[str, str] | None:
    """The exemplar labels for observations under ``span``: its trace and span ids, if sampled
    (OpenMetrics' and OpenTelemetry's usual labels; OTLP carries them in its own fields)."""
    global _last_exemplar
    last = _last_exemplar
    if last[0] is span:
        return last[1]
    context = span.get_span_context()
    exemplar = None
    if context.trace_flags.sampled:
        exemplar = {
            "trace_id": format(context.trace_id, "032x"),
            "span_id": format(context.span_id, "016x"),
        }
    _last_exemplar = (span, exemplar)
    return exemplar


class ReceiverBinding:
    """What one (signal, receiver name) pair records, bound once."""

    __slots__ = (
        "_errors",
        "_errors_family",
        "_labels",
        "attributes",
        "duration",
        "exemplify",
        "span_name",
    )

    def __init__(self, signal: str, name: str, metrics: MetricSet | None) -> None:
        self._labels = (signal, name)
        self._errors_family = metrics.receiver_errors if metrics else None
        self._errors: dict[type[BaseException], CounterChild] = {}
        self.duration: HistogramChild | None = (
            metrics.receiver_duration.child(signal, name) if metrics else None
        )
        self.exemplify = _exemplifier(self.duration)
        self.span_name = f"receiver {name}"
        self.attributes = {
            tracing.ATTR_SIGNAL_NAME: signal,
            tracing.CODE_FUNCTION_NAME: name,
        }

    def count_error(self, exc: BaseException) -> None:
        """Count one call that raised ``exc`` (its duration is recorded as any other's)."""
        try:
            if self._errors_family is not None:
                child = self._errors.get(type(exc))
                if child is None:
                    exception = naming.clean_label(type(exc).__name__)
                    child = self._errors_family.child(*self._labels, exception)
                    self._errors[type(exc)] = child
                child.inc()
        except Exception:
            internal_error("receiver metrics")


_MAX_SHARED_RECEIVERS = 1000  # receiver names a signal keeps bindings for

# (binding, receiver is a coroutine function, records the call's duration):
# what the send needs of a receiver, in one dict lookup.
Bound = tuple[ReceiverBinding, bool, Callable[[float], None]]


class SignalBinding:
    """What one signal records, bound at its first send."""

    __slots__ = (
        "_metrics",
        "_names",
        "app_attributes",
        "attributes",
        "bound",
        "count_send",
        "duration",
        "exemplify",
        "name",
        "plain_receivers",
        "receivers",
        "record",
        "recorded",
        "span_name",
    )

    def __init__(
        self,
        name: str,
        recorded: bool,
        metrics: MetricSet | None,
    ) -> None:
        self.name = name
        self.recorded = recorded
        metrics = metrics if recorded else None
        self._metrics = metrics
        self.count_send: Callable[[], object] = (
            _safe(metrics.signal_sends.child(name).inc, "send counting") if metrics else _ignore
        )
        self.duration: HistogramChild | None = (
            metrics.signal_duration.child(name) if metrics else None
        )
        self.record: Callable[[float], None] = (
            _safe(self.duration.record, "signal metrics") if self.duration else _ignore
        )
        self.exemplify = _exemplifier(self.duration)
        self._names: dict[str, ReceiverBinding] = {}
        self.receivers: IdentityCache[Bound] = IdentityCache()
        self.bound = self.receivers.get  # the send's lookup: bound(id(receiver))
        self.span_name = f"signal {name}"
        self.attributes = {tracing.ATTR_SIGNAL_NAME: name}
        # The signal span's attributes when the last Flask app sent it (weakly):
        # the same dict for every send of that app, made once.
        self.app_attributes: tuple[weakref.ref[t.Any], dict[str, t.Any]] | None = None
        # Set by the patch: the signal's class finds receivers as blinker's does.
        self.plain_receivers = False

    def lookup(self, receiver: t.Any) -> Bound:
        """The receiver's binding after ``receivers.get(id(receiver))`` missed.

        A bound method is a new object at each send: cached under its function.
        """
        if type(receiver) is types.MethodType:
            found = self.receivers.get(id(receiver.__func__))
            if found is not None:
                return found
        try:
            info = naming.receiver_info(receiver)
            name, is_coroutine = info.name, info.is_coroutine
        except Exception:
            from inspect import iscoroutinefunction

            is_coroutine = iscoroutinefunction(receiver)  # raises where blinker's send would
            internal_error("receiver naming")
            name = naming.UNKNOWN_RECEIVER
        binding = self._names.get(name)
        if binding is None:
            binding = ReceiverBinding(self.name, name, self._metrics)
            # Shared by name up to a bound; past it each receiver owns its
            # binding, which leaves with the receiver (names are unbounded).
            if len(self._names) < _MAX_SHARED_RECEIVERS:
                self._names[name] = binding
        duration = binding.duration
        record = _safe(duration.record, "receiver metrics") if duration else _ignore
        bound = (binding, is_coroutine, record)
        if name != naming.UNKNOWN_RECEIVER:
            key = receiver.__func__ if type(receiver) is types.MethodType else receiver
            self.receivers.put(key, bound)
        return bound


def unrecorded(name: str) -> SignalBinding:
    """A binding that records nothing (an excluded signal, or a failed binding)."""
    return SignalBinding(name, False, None)
