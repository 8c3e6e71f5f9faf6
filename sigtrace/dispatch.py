"""The patch: the only code that touches blinker internals.

:func:`instrument` replaces ``blinker.Signal.send`` and ``Signal.send_async`` at
class level with traced copies that keep blinker's semantics exactly (see
DESIGN.md): positional-only sender, muting first, receivers taken lazily from
``receivers_for``, coroutine handling through ``_async_wrapper`` /
``_sync_wrapper`` with blinker's own errors, the original receivers in the
result, exceptions propagated as the same object, no reference kept.

Per signal a :class:`SignalProbe` holds everything bound once (name, metric
children, span names); per receiver a :class:`ReceiverProbe`. The hot path is
:func:`_traced_send`; anything that fails inside sigtrace is caught by
:func:`_internal_error` and never reaches the app.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import typing as t
import weakref
from collections.abc import Callable, Iterable
from contextvars import Token
from time import perf_counter

from blinker import Signal
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span

from . import naming, tracing
from .metrics import DEFAULT_BUCKETS, DEFAULT_MAX_LABEL_VALUES, MetricSet, metric_set

__all__ = [
    "Hooks",
    "instrument",
    "is_instrumented",
    "set_hooks",
    "uninstrument",
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


def _noop() -> None:
    return None


class _NoHistogram:
    @staticmethod
    def observe(amount: float, exemplar: dict[str, str] | None = None) -> None:
        return None


_NO_HISTOGRAM = _NoHistogram()


class ReceiverProbe:
    """What one (signal, receiver name) pair records, bound once."""

    __slots__ = ("_errors_family", "_labels", "attributes", "duration", "errors", "span_name")

    def __init__(self, signal_probe: SignalProbe, name: str) -> None:
        metrics = _active.metrics if _active else None
        self._labels = (signal_probe.name, name)
        self._errors_family = metrics.receiver_errors if metrics else None
        self.duration = (
            metrics.receiver_duration.child(signal_probe.name, name) if metrics else _NO_HISTOGRAM
        )
        self.errors: dict[type[BaseException], t.Any] = {}
        self.span_name = f"receiver {name}"
        self.attributes = {
            tracing.ATTR_SIGNAL_NAME: signal_probe.name,
            tracing.CODE_FUNCTION_NAME: name,
        }

    def count_error(self, exc: BaseException) -> None:
        child = self.errors.get(type(exc))
        if child is None:
            if self._errors_family is None:
                return
            child = self._errors_family.child(*self._labels, naming.clean_label(type(exc).__name__))
            self.errors[type(exc)] = child
        child.inc()


class SignalProbe:
    """What one signal records, bound once at its first send."""

    __slots__ = (
        "__weakref__",
        "attributes",
        "count_send",
        "duration",
        "enabled",
        "hooks",
        "name",
        "receivers",
        "span_name",
    )  # fmt: skip

    def __init__(self, signal: Signal, sender: t.Any, active: _Instrumentation) -> None:
        self.name = naming.signal_name(signal, sender)
        self.enabled = active.records(self.name)
        self.hooks = _hooks.get(id(signal))
        metrics = active.metrics if self.enabled else None
        self.count_send: Callable[[], object] = (
            metrics.signal_sends.child(self.name).inc if metrics else _noop
        )
        self.duration = metrics.signal_duration.child(self.name) if metrics else _NO_HISTOGRAM
        self.receivers: dict[str, ReceiverProbe] = {}
        self.span_name = f"signal {self.name}"
        self.attributes = {tracing.ATTR_SIGNAL_NAME: self.name}

    def receiver(self, receiver: t.Any) -> tuple[ReceiverProbe, bool]:
        """The probe for ``receiver`` and whether it is a coroutine function."""
        info = naming.receiver_info(receiver)
        probe = self.receivers.get(info.name)
        if probe is None:
            probe = self.receivers[info.name] = ReceiverProbe(self, info.name)
        return probe, info.is_coroutine


class _Instrumentation:
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
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


_lock = threading.RLock()
_refcount = 0
_active: _Instrumentation | None = None
_originals: dict[str, t.Any] = {}
_probes: dict[int, SignalProbe] = {}  # id(signal) -> probe; cleaned by weakref callback
_probe_refs: dict[int, weakref.ref[Signal]] = {}
_hooks: dict[int, Hooks] = {}
_seen_signals: weakref.WeakSet[Signal] = weakref.WeakSet()
_fault_lock = threading.Lock()
_faults_logged: set[str] = set()


def _internal_error(where: str) -> None:
    """Log a fault inside sigtrace once per place; never raise."""
    try:
        with _fault_lock:
            if where in _faults_logged:
                return
            _faults_logged.add(where)
        log.warning(
            "sigtrace: internal error in %s; the app is unaffected and this is logged once",
            where,
            exc_info=True,
        )
    except Exception:  # pragma: no cover - logging itself broken
        pass


def _probe_for(signal: Signal, sender: t.Any) -> SignalProbe:
    active = _active
    if active is None:  # raced with uninstrument(); record nothing
        return _DISABLED_PROBE
    probe = SignalProbe(signal, sender, active)
    key = id(signal)

    def forget(_ref: weakref.ref[Signal], key: int = key) -> None:
        _probes.pop(key, None)
        _probe_refs.pop(key, None)

    with _lock:
        _probe_refs[key] = weakref.ref(signal, forget)
        _probes[key] = probe
        _seen_signals.add(signal)
    return probe


def _new_probe(signal: Signal, sender: t.Any) -> SignalProbe:
    try:
        return _probe_for(signal, sender)
    except Exception:
        _internal_error("signal naming")
        return _DISABLED_PROBE


class _DisabledProbe(SignalProbe):
    def __init__(self) -> None:
        self.name = naming.ANONYMOUS_SIGNAL
        self.enabled = False
        self.hooks = None
        self.count_send = _noop
        self.duration = _NO_HISTOGRAM
        self.receivers = {}
        self.span_name = ""
        self.attributes = {}


_DISABLED_PROBE = _DisabledProbe()


# --------------------------------------------------------------------------
# The traced send (hot path)


def send(
    self: Signal,
    sender: t.Any | None = None,
    /,
    *,
    _async_wrapper: Callable[[Callable[..., t.Any]], Callable[..., t.Any]] | None = None,
    **kwargs: t.Any,
) -> list[tuple[Callable[..., t.Any], t.Any]]:
    """blinker's ``Signal.send``, recording metrics and spans (see module doc)."""
    if self.is_muted:
        return []
    probe = _probes.get(id(self)) or _new_probe(self, sender)
    if probe.hooks is not None:
        return _send_with_hooks(self, probe, sender, _async_wrapper, kwargs)
    if not self.receivers:
        probe.count_send()
        return []
    if not probe.enabled:
        return _originals["send"](self, sender, _async_wrapper=_async_wrapper, **kwargs)  # type: ignore[no-any-return]
    return _traced_send(self, probe, sender, _async_wrapper, kwargs)


def _traced_send(
    signal: Signal,
    probe: SignalProbe,
    sender: t.Any,
    async_wrapper: Callable[[Callable[..., t.Any]], Callable[..., t.Any]] | None,
    kwargs: dict[str, t.Any],
) -> list[tuple[Callable[..., t.Any], t.Any]]:
    probe.count_send()
    results: list[tuple[Callable[..., t.Any], t.Any]] = []
    record: _SendRecord | None = None
    try:
        for receiver in signal.receivers_for(sender):
            if record is None:
                record = _SendRecord(probe, sender, kwargs)
            rprobe, is_coroutine = record.receiver(receiver)
            if is_coroutine:
                if async_wrapper is None:
                    raise RuntimeError("Cannot send to a coroutine function.")
                call = async_wrapper(receiver)
            else:
                call = receiver
            span = record.start_receiver(rprobe)
            started = perf_counter()
            try:
                result = call(sender, **kwargs)
            except BaseException as exc:
                record.receiver_failed(rprobe, span, perf_counter() - started, exc)
                raise
            record.receiver_done(rprobe, span, perf_counter() - started)
            results.append((receiver, result))
    except BaseException as exc:
        if record is not None:
            record.finish(exc)
        raise
    if record is not None:
        record.finish(None)
    return results


async def send_async(
    self: Signal,
    sender: t.Any | None = None,
    /,
    *,
    _sync_wrapper: Callable[[Callable[..., t.Any]], Callable[..., t.Any]] | None = None,
    **kwargs: t.Any,
) -> list[tuple[Callable[..., t.Any], t.Any]]:
    """blinker's ``Signal.send_async``, recording metrics and spans."""
    if self.is_muted:
        return []
    probe = _probes.get(id(self)) or _new_probe(self, sender)
    if not self.receivers:
        probe.count_send()
        return []
    if not probe.enabled:
        return await _originals["send_async"](self, sender, _sync_wrapper=_sync_wrapper, **kwargs)  # type: ignore[no-any-return]
    probe.count_send()
    results: list[tuple[Callable[..., t.Any], t.Any]] = []
    record: _SendRecord | None = None
    try:
        for receiver in self.receivers_for(sender):
            if record is None:
                record = _SendRecord(probe, sender, kwargs)
            rprobe, is_coroutine = record.receiver(receiver)
            if not is_coroutine:
                if _sync_wrapper is None:
                    raise RuntimeError("Cannot send to a non-coroutine function.")
                call = _sync_wrapper(receiver)
            else:
                call = receiver
            span = record.start_receiver(rprobe)
            started = perf_counter()
            try:
                result = await call(sender, **kwargs)
            except BaseException as exc:
                record.receiver_failed(rprobe, span, perf_counter() - started, exc)
                raise
            record.receiver_done(rprobe, span, perf_counter() - started)
            results.append((receiver, result))
    except BaseException as exc:
        if record is not None:
            record.finish(exc)
        raise
    if record is not None:
        record.finish(None)
    return results


class _SendRecord:
    """Timing, spans and exemplar of one send that reached a receiver.

    Every method swallows its own faults: a broken tracer or metric backend
    costs the recording, never the send.
    """

    __slots__ = ("called", "exemplar", "probe", "receiver_spans", "span", "started", "token")

    def __init__(self, probe: SignalProbe, sender: t.Any, kwargs: dict[str, t.Any]) -> None:
        self.probe = probe
        self.called = 0
        self.span: Span | None = None
        self.token: Token[Context] | None = None
        self.receiver_spans = False
        self.exemplar: dict[str, str] | None = None
        active = _active
        if active is not None and active.tracer is not None:
            try:
                self._open(active, sender, kwargs)
            except Exception:
                _internal_error("signal span start")
        self.started = perf_counter()

    def _open(self, active: _Instrumentation, sender: t.Any, kwargs: dict[str, t.Any]) -> None:
        parent = trace.get_current_span()
        if not parent.is_recording():
            if parent is not INVALID_SPAN or not active.root_spans:
                return  # unsampled parent, or no parent and no root spans: no objects
        elif parent.get_span_context().trace_flags.sampled:
            self.exemplar = {"trace_id": format(parent.get_span_context().trace_id, "032x")}
        self.receiver_spans = active.receiver_spans
        if not active.signal_spans:
            return
        attributes = self.probe.attributes
        if active.record_kwargs or isinstance(sender, _FlaskApp):
            attributes = dict(attributes)
            if isinstance(sender, _FlaskApp):
                attributes[tracing.ATTR_APP_NAME] = str(sender.name)
            attributes.update(tracing.kwarg_attributes(active.record_kwargs, kwargs))
        assert active.tracer is not None
        span = active.tracer.start_span(
            self.probe.span_name, kind=tracing.INTERNAL, attributes=attributes
        )
        self.span = span
        self.token = otel_context.attach(trace.set_span_in_context(span))
        if self.exemplar is None and span.get_span_context().trace_flags.sampled:
            self.exemplar = {"trace_id": format(span.get_span_context().trace_id, "032x")}

    def receiver(self, receiver: t.Any) -> tuple[ReceiverProbe, bool]:
        self.called += 1
        try:
            return self.probe.receiver(receiver)
        except Exception:
            _internal_error("receiver naming")
            from inspect import iscoroutinefunction

            return _fallback_receiver_probe(self.probe), iscoroutinefunction(receiver)

    def start_receiver(self, rprobe: ReceiverProbe) -> tuple[Span, Token[Context]] | None:
        if not self.receiver_spans:
            return None
        try:
            active = _active
            assert active is not None and active.tracer is not None
            span = active.tracer.start_span(
                rprobe.span_name, kind=tracing.INTERNAL, attributes=rprobe.attributes
            )
            return span, otel_context.attach(trace.set_span_in_context(span))
        except Exception:
            _internal_error("receiver span start")
            return None

    def receiver_done(
        self, rprobe: ReceiverProbe, span: tuple[Span, Token[Context]] | None, elapsed: float
    ) -> None:
        try:
            rprobe.duration.observe(elapsed, self.exemplar)
            if span is not None:
                otel_context.detach(span[1])
                span[0].end()
        except Exception:
            _internal_error("receiver recording")

    def receiver_failed(
        self,
        rprobe: ReceiverProbe,
        span: tuple[Span, Token[Context]] | None,
        elapsed: float,
        exc: BaseException,
    ) -> None:
        try:
            rprobe.duration.observe(elapsed, self.exemplar)
            rprobe.count_error(exc)
            if span is not None:
                otel_context.detach(span[1])
                tracing.mark_error(span[0], exc)
                span[0].end()
        except Exception:
            _internal_error("receiver error recording")

    def finish(self, exc: BaseException | None) -> None:
        try:
            self.probe.duration.observe(perf_counter() - self.started, self.exemplar)
            span = self.span
            if span is not None and self.token is not None:
                otel_context.detach(self.token)
                span.set_attribute(tracing.ATTR_RECEIVERS_COUNT, self.called)
                if exc is not None:
                    tracing.mark_error(span, exc)
                span.end()
        except Exception:
            _internal_error("signal recording")


def _fallback_receiver_probe(probe: SignalProbe) -> ReceiverProbe:
    found = probe.receivers.get(naming.UNKNOWN_RECEIVER)
    if found is None:
        found = probe.receivers[naming.UNKNOWN_RECEIVER] = ReceiverProbe(
            probe, naming.UNKNOWN_RECEIVER
        )
    return found


def _send_with_hooks(
    signal: Signal,
    probe: SignalProbe,
    sender: t.Any,
    async_wrapper: Callable[[Callable[..., t.Any]], Callable[..., t.Any]] | None,
    kwargs: dict[str, t.Any],
) -> list[tuple[Callable[..., t.Any], t.Any]]:
    hooks = probe.hooks
    assert hooks is not None
    _run_hook(hooks.before, sender, kwargs)
    try:
        if not probe.enabled:
            return _originals["send"](signal, sender, _async_wrapper=async_wrapper, **kwargs)  # type: ignore[no-any-return]
        if not signal.receivers:
            probe.count_send()
            return []
        return _traced_send(signal, probe, sender, async_wrapper, kwargs)
    finally:
        _run_hook(hooks.after, sender, kwargs)


def _run_hook(hook: Hook | None, sender: t.Any, kwargs: dict[str, t.Any]) -> None:
    if hook is None:
        return
    try:
        hook(sender, kwargs)
    except Exception:
        _internal_error(getattr(hook, "__qualname__", "hook"))


try:  # Flask apps as senders get their name on signal spans.
    from flask.sansio.app import App as _FlaskApp
except ImportError:  # pragma: no cover - flask is a dependency

    class _FlaskApp:  # type: ignore[no-redef]
        name = ""


# --------------------------------------------------------------------------
# Installing and removing the patch


def instrument(
    registry: t.Any = None,
    tracer_provider: trace.TracerProvider | None = None,
    *,
    metrics: bool = True,
    tracing_enabled: bool = True,
    spans: tracing.SpanMode = "all",
    root_spans: bool = False,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    record_kwargs: Iterable[str] = (),
    buckets: Iterable[float] = DEFAULT_BUCKETS,
    max_label_values: int = DEFAULT_MAX_LABEL_VALUES,
) -> None:
    """Trace every blinker ``Signal.send`` and ``send_async`` in the process.

    Idempotent and reference-counted: each call must be matched by one
    :func:`uninstrument`. The first call's settings hold until the last
    ``uninstrument()``; a later call with a different ``registry`` or
    ``tracer_provider`` raises :class:`ValueError`, since signals are
    process-wide and their metrics can live in one registry only.

    :param registry: where metrics go; ``prometheus_client.REGISTRY`` by default.
    :param tracer_provider: where spans go; the global provider by default.
    """
    global _refcount, _active
    with _lock:
        if _refcount:
            assert _active is not None
            if registry is not None and registry is not _active.registry:
                raise ValueError(
                    "sigtrace is already instrumented with another registry; call "
                    "sigtrace.uninstrument() first or pass the same registry"
                )
            if tracer_provider is not None and tracer_provider is not _active.tracer_provider:
                raise ValueError(
                    "sigtrace is already instrumented with another tracer_provider; "
                    "call sigtrace.uninstrument() first or pass the same provider"
                )
            _refcount += 1
            return
        if spans not in tracing.SPAN_MODES:
            raise ValueError(f"spans must be one of {tracing.SPAN_MODES}, got {spans!r}")
        _active = _Instrumentation(
            registry, tracer_provider, metrics, tracing_enabled, spans, root_spans,
            include, exclude, record_kwargs, buckets, max_label_values,
        )  # fmt: skip
        _probes.clear()
        _probe_refs.clear()
        _originals["send"] = Signal.__dict__["send"]
        _originals["send_async"] = Signal.__dict__["send_async"]
        Signal.send = send  # type: ignore[method-assign]
        Signal.send_async = send_async  # type: ignore[method-assign]
        _refcount = 1


def uninstrument() -> None:
    """Undo one :func:`instrument`; the last one restores blinker's functions.

    After it, ``Signal.send is`` the function that was there before the first
    ``instrument()``. Extra calls do nothing.
    """
    global _refcount, _active
    with _lock:
        if _refcount == 0:
            return
        _refcount -= 1
        if _refcount:
            return
        Signal.send = _originals.pop("send")  # type: ignore[method-assign]
        Signal.send_async = _originals.pop("send_async")  # type: ignore[method-assign]
        _active = None
        _probes.clear()
        _probe_refs.clear()


def is_instrumented() -> bool:
    """True between the first :func:`instrument` and the last :func:`uninstrument`."""
    return _refcount > 0


def set_hooks(signal: Signal, hooks: Hooks | None) -> None:
    """Run ``hooks`` around ``signal``'s receivers (or stop, with None)."""
    with _lock:
        if hooks is None:
            _hooks.pop(id(signal), None)
        else:
            _hooks[id(signal)] = hooks
        probe = _probes.get(id(signal))
        if probe is not None:
            probe.hooks = hooks


def active_metrics() -> MetricSet | None:
    """The metric set of the active instrumentation, if metrics are on."""
    active = _active
    return active.metrics if active is not None else None


def seen_signals() -> list[Signal]:
    """Signals sent since instrumentation (for the CLI)."""
    with _lock:
        return list(_seen_signals)


def probe_name(signal: Signal) -> str | None:
    """The label a signal's metrics use, if it was sent while instrumented."""
    probe = _probes.get(id(signal))
    return probe.name if probe is not None else None
