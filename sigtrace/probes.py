"""What the traced send records, bound once per signal and per receiver.

A :class:`SignalProbe` is made at a signal's first send: its label, whether it
is recorded, its metric children and span name. Each receiver is bound once to
a :class:`ReceiverProbe` (its children, span name, attributes) and cached by
identity, so the hot path does one dict lookup per receiver. :class:`SendSpans`
holds the spans of one send made under a recording parent; it exists only then.

Every method that records swallows its own faults through
:func:`internal_error`: a broken tracer or metric backend costs the recording,
never the send.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import threading
import types
import typing as t
import weakref
from collections.abc import Callable, Iterable
from contextvars import Token
from time import perf_counter

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span

from . import naming, tracing
from .metrics import FastHistogram, MetricSet, metric_set

__all__ = [
    "Hooks",
    "exemplar_of",
    "Instrumentation",
    "ReceiverProbe",
    "SendSpans",
    "SignalProbe",
    "internal_error",
]

log = logging.getLogger("sigtrace")

Hook = Callable[[t.Any, dict[str, t.Any]], None]


class Hooks(t.NamedTuple):
    """sigtrace's own code run around a signal's receivers (Flask request timing).

    Hooks are not receivers: they never show in ``signal.receivers``, metrics,
    spans or results, and run even for signals excluded from recording.
    """

    before: Hook | None = None
    after: Hook | None = None


_fault_lock = threading.Lock()
_faults_logged: set[str] = set()


def internal_error(where: str) -> None:
    """Log a fault inside sigtrace once per place; never raise.

    Only the process's first fault is a warning: one broken part (a tracer, a
    metric backend) fails in several places, and the log must not fill up.
    """
    try:
        with _fault_lock:
            if where in _faults_logged:
                return
            first = not _faults_logged
            _faults_logged.add(where)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "sigtrace: internal error in %s; the app is unaffected and this is logged once",
            where,
            exc_info=True,
        )
    except Exception:  # pragma: no cover - logging itself broken
        pass


def _noop() -> None:
    return None


def _never_raising(inc: Callable[[], object]) -> Callable[[], object]:
    """``inc`` itself when it cannot fail (our counter's C increment), else guarded.

    prometheus-client's multiprocess counters write to mmap files and can fail;
    the hot path calls ``count_send()`` unguarded, so the guard lives here.
    """
    if isinstance(getattr(inc, "__self__", None), itertools.count):
        return inc

    def guarded() -> None:
        try:
            inc()
        except Exception:
            internal_error("send counting")

    return guarded


class _NoHistogram:
    @staticmethod
    def observe(amount: float, exemplar: dict[str, str] | None = None) -> None:
        return None


NO_HISTOGRAM = _NoHistogram()


class Instrumentation:
    """The process-wide settings of the active instrumentation."""

    def __init__(
        self,
        registry: t.Any,
        tracer_provider: trace.TracerProvider | None,
        metrics: bool,
        tracing_enabled: bool,
        spans: tracing.SpanMode,
        root_spans: bool,
        include: Iterable[str],
        exclude: Iterable[str],
        record_kwargs: Iterable[str],
        buckets: Iterable[float],
        max_label_values: int,
    ) -> None:
        self.registry = registry
        self.tracer_provider = tracer_provider
        self.metrics: MetricSet | None = (
            metric_set(registry, tuple(buckets), max_label_values) if metrics else None
        )
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.tracer = tracing.get_tracer(tracer_provider) if tracing_enabled else None
        self.signal_spans = self.tracer is not None and spans in ("all", "signals")
        self.receiver_spans = self.tracer is not None and spans in ("all", "receivers")
        self.root_spans = root_spans
        self.record_kwargs = frozenset(record_kwargs)

    def records(self, name: str) -> bool:
        """Whether the include/exclude patterns let signal ``name`` be recorded."""
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


class ReceiverProbe:
    """What one (signal, receiver name) pair records, bound once."""

    __slots__ = (
        "_errors_family", "_labels", "add", "attributes", "duration", "errors", "span_name",
    )  # fmt: skip

    def __init__(self, signal: SignalProbe, name: str, metrics: MetricSet | None) -> None:
        self._labels = (signal.name, name)
        self._errors_family = metrics.receiver_errors if metrics else None
        self.duration = (
            metrics.receiver_duration.child(signal.name, name) if metrics else NO_HISTOGRAM
        )
        self.add = _add_of(self.duration)
        self.errors: dict[type[BaseException], t.Any] = {}
        self.span_name = f"receiver {name}"
        self.attributes = {
            tracing.ATTR_SIGNAL_NAME: signal.name,
            tracing.CODE_FUNCTION_NAME: name,
        }

    def record(
        self,
        elapsed: float,
        exemplar: dict[str, str] | None,
        exc: BaseException | None,
    ) -> None:
        """Observe one call (and count its exception); never raises."""
        try:
            self.duration.observe(elapsed, exemplar)
            if exc is not None and self._errors_family is not None:
                child = self.errors.get(type(exc))
                if child is None:
                    exception = naming.clean_label(type(exc).__name__)
                    child = self._errors_family.child(*self._labels, exception)
                    self.errors[type(exc)] = child
                child.inc()
        except Exception:
            internal_error("receiver metrics")


def _add_of(histogram: t.Any) -> Callable[[float], int] | None:
    """The histogram's ``add`` (sigtrace's own single-process child), else None."""
    return histogram.add if isinstance(histogram, FastHistogram) else None


_MAX_SHARED_RECEIVERS = 1000  # receiver names a signal keeps probes for
# (probe, receiver is a coroutine function, probe.add): what the send needs,
# in one dict lookup per receiver.
Binding = tuple[ReceiverProbe, bool, Callable[[float], int] | None]


class SignalProbe:
    """What one signal records, bound once at its first send."""

    __slots__ = (
        "__weakref__",
        "_metrics",
        "_refs",
        "add",
        "attributes",
        "by_identity",
        "count_send",
        "duration",
        "enabled",
        "hooks",
        "lean",
        "name",
        "receivers",
        "span_name",
    )

    def __init__(
        self,
        name: str,
        active: Instrumentation | None,
        hooks: Hooks | None,
    ) -> None:
        self.name = name
        self.enabled = active is not None and active.records(name)
        metrics = active.metrics if active is not None and self.enabled else None
        self._metrics = metrics
        self.count_send: Callable[[], object] = (
            _never_raising(metrics.signal_sends.child(name).inc) if metrics else _noop
        )
        self.duration = metrics.signal_duration.child(name) if metrics else NO_HISTOGRAM
        self.add = _add_of(self.duration)
        self.lean = False
        self.set_hooks(hooks)
        self.receivers: dict[str, ReceiverProbe] = {}
        # id(receiver identity) -> binding; entries leave with their receiver
        # (weakref callback) before the id can be reused.
        self.by_identity: dict[int, Binding] = {}
        self._refs: dict[int, weakref.ref[t.Any]] = {}
        self.span_name = f"signal {name}"
        self.attributes = {tracing.ATTR_SIGNAL_NAME: name}

    def set_hooks(self, hooks: Hooks | None) -> None:
        """Set the hooks; a send takes the lean path only without them."""
        self.hooks = hooks
        # The lean path (dispatch.send): recorded, no hooks, sigtrace's own histograms.
        self.lean = self.enabled and hooks is None and self.add is not None

    def lookup(self, receiver: t.Any) -> Binding:
        """The receiver's binding after ``by_identity`` missed on ``id(receiver)``.

        A bound method is a new object at each send, cached under its function.
        """
        if type(receiver) is types.MethodType:
            found = self.by_identity.get(id(receiver.__func__))
            if found is not None:
                return found
        return self.bind(receiver)

    def bind(self, receiver: t.Any) -> Binding:
        """The slow path of the receiver lookup: name it, bind it, cache it."""
        try:
            info = naming.receiver_info(receiver)
            probe = self.receivers.get(info.name)
            if probe is None:
                probe = ReceiverProbe(self, info.name, self._metrics)
                # Shared by name up to a bound; past it each binding owns its
                # probe, which leaves with the receiver (names are unbounded).
                if len(self.receivers) < _MAX_SHARED_RECEIVERS:
                    self.receivers[info.name] = probe
            binding = (probe, info.is_coroutine, probe.add)
        except Exception:
            from inspect import iscoroutinefunction

            is_coroutine = iscoroutinefunction(receiver)  # raises where blinker's send would
            internal_error("receiver naming")
            unknown = self._unknown()
            return unknown, is_coroutine, unknown.add
        key = receiver.__func__ if type(receiver) is types.MethodType else receiver
        key_id = id(key)
        by_identity, refs = self.by_identity, self._refs

        def forget(_ref: weakref.ref[t.Any]) -> None:
            by_identity.pop(key_id, None)
            refs.pop(key_id, None)

        try:
            refs[key_id] = weakref.ref(key, forget)
        except TypeError:
            return binding  # not weakly referenceable: looked up by name each time
        by_identity[key_id] = binding
        return binding

    def _unknown(self) -> ReceiverProbe:
        probe = self.receivers.get(naming.UNKNOWN_RECEIVER)
        if probe is None:
            probe = ReceiverProbe(self, naming.UNKNOWN_RECEIVER, self._metrics)
            self.receivers[naming.UNKNOWN_RECEIVER] = probe
        return probe

    def finish(self, started: float, spans: SendSpans | None, exc: BaseException | None) -> None:
        """Observe the send's duration and end its span; never raises."""
        try:
            self.duration.observe(
                perf_counter() - started, spans.exemplar if spans is not None else None
            )
        except Exception:
            internal_error("signal metrics")
        if spans is not None:
            try:
                spans.close(exc)  # even when the metric failed: it detaches the context
            except Exception:
                internal_error("signal span end")


DISABLED_PROBE = SignalProbe(naming.ANONYMOUS_SIGNAL, None, None)


def exemplar_of(span: Span) -> dict[str, str] | None:
    """The exemplar labels for observations under ``span``: its trace id, if sampled."""
    context = span.get_span_context()
    if context.trace_flags.sampled:
        return {"trace_id": format(context.trace_id, "032x")}
    return None


_FlaskApp: type[t.Any]
try:  # Flask apps as senders get their name on signal spans.
    from flask.sansio.app import App as _FlaskApp
except ImportError:  # pragma: no cover - flask is a dependency
    _FlaskApp = type(None)


class SendSpans:
    """The spans of one send under a recording parent (or a root, if asked).

    :meth:`open` returns None, allocating nothing, when there is no recording
    parent: an unsampled send costs one context lookup.
    """

    __slots__ = ("called", "exemplar", "span", "token", "tracer", "with_receivers")

    def __init__(self, tracer: trace.Tracer, exemplar: dict[str, str] | None) -> None:
        self.tracer = tracer
        self.exemplar = exemplar
        self.span: Span | None = None
        self.token: Token[Context] | None = None
        self.with_receivers = False
        self.called = 0

    @staticmethod
    def open(
        active: Instrumentation | None,
        probe: SignalProbe,
        sender: t.Any,
        kwargs: dict[str, t.Any],
    ) -> SendSpans | None:
        if active is None or active.tracer is None:
            return None
        try:
            parent = trace.get_current_span()
            if not parent.is_recording() and (parent is not INVALID_SPAN or not active.root_spans):
                return None  # unsampled parent, or no parent and no root spans
            spans = SendSpans(active.tracer, exemplar_of(parent))
            spans.with_receivers = active.receiver_spans
            if active.signal_spans:
                spans._start_signal_span(active, probe, sender, kwargs)
            return spans
        except Exception:
            internal_error("signal span start")
            return None

    def _start_signal_span(
        self,
        active: Instrumentation,
        probe: SignalProbe,
        sender: t.Any,
        kwargs: dict[str, t.Any],
    ) -> None:
        attributes = probe.attributes
        is_app = isinstance(sender, _FlaskApp)
        if active.record_kwargs or is_app:
            attributes = dict(attributes)
            if is_app:
                attributes[tracing.ATTR_APP_NAME] = str(sender.name)
            attributes.update(tracing.kwarg_attributes(active.record_kwargs, kwargs))
        span = self.tracer.start_span(probe.span_name, kind=tracing.INTERNAL, attributes=attributes)
        self.span = span
        self.token = otel_context.attach(trace.set_span_in_context(span))
        if self.exemplar is None:
            self.exemplar = exemplar_of(span)

    def call(
        self,
        probe: ReceiverProbe,
        call: Callable[..., t.Any],
        sender: t.Any,
        kwargs: dict[str, t.Any],
    ) -> t.Any:
        """Run one receiver inside its span (when receiver spans are on)."""
        span, token = self._start_receiver(probe)
        started = perf_counter()
        try:
            result = call(sender, **kwargs)
        except BaseException as exc:
            self._end_receiver(probe, span, token, perf_counter() - started, exc)
            raise
        self._end_receiver(probe, span, token, perf_counter() - started, None)
        return result

    async def await_call(
        self,
        probe: ReceiverProbe,
        call: Callable[..., t.Any],
        sender: t.Any,
        kwargs: dict[str, t.Any],
    ) -> t.Any:
        """Await one receiver inside its span: the span covers the awaited work."""
        span, token = self._start_receiver(probe)
        started = perf_counter()
        try:
            result = await call(sender, **kwargs)
        except BaseException as exc:
            self._end_receiver(probe, span, token, perf_counter() - started, exc)
            raise
        self._end_receiver(probe, span, token, perf_counter() - started, None)
        return result

    def _start_receiver(self, probe: ReceiverProbe) -> tuple[Span | None, Token[Context] | None]:
        self.called += 1
        if not self.with_receivers:
            return None, None
        try:
            span = self.tracer.start_span(
                probe.span_name, kind=tracing.INTERNAL, attributes=probe.attributes
            )
            return span, otel_context.attach(trace.set_span_in_context(span))
        except Exception:
            internal_error("receiver span start")
            return None, None

    def _end_receiver(
        self,
        probe: ReceiverProbe,
        span: Span | None,
        token: Token[Context] | None,
        elapsed: float,
        exc: BaseException | None,
    ) -> None:
        probe.record(elapsed, self.exemplar, exc)
        if span is None:
            return
        try:
            if token is not None:
                otel_context.detach(token)
            if exc is not None:
                tracing.mark_error(span, exc)
            span.end()
        except Exception:
            internal_error("receiver span end")

    def close(self, exc: BaseException | None) -> None:
        span = self.span
        if span is None:
            return
        if self.token is not None:
            otel_context.detach(self.token)
        span.set_attribute(tracing.ATTR_RECEIVERS_COUNT, self.called)
        if exc is not None:
            tracing.mark_error(span, exc)
        span.end()
