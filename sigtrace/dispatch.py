"""The patch: the only code that touches blinker internals.

:func:`instrument` replaces ``blinker.Signal.send`` and ``Signal.send_async`` at
class level with traced copies that keep blinker's semantics exactly (see
DESIGN.md): positional-only sender, muting first, receivers taken lazily from
``receivers_for``, coroutine handling through ``_async_wrapper`` /
``_sync_wrapper`` with blinker's own errors, the original receivers in the
result, exceptions propagated as the same object, no reference kept.

The hot path is :func:`send` (and its async mirror); what it records is
bound once per signal and receiver in :mod:`sigtrace.probes`.
"""

from __future__ import annotations

import threading
import typing as t
import weakref
from collections.abc import Callable, Iterable
from time import perf_counter

from blinker import Signal
from opentelemetry import trace
from opentelemetry.trace import Span

from . import naming, tracing
from .metrics import DEFAULT_BUCKETS, DEFAULT_MAX_LABEL_VALUES, MetricSet
from .probes import (
    DISABLED_PROBE,
    Hooks,
    Instrumentation,
    SendSpans,
    SignalProbe,
    internal_error,
)

__all__ = [
    "Hooks",
    "instrument",
    "is_instrumented",
    "set_hooks",
    "uninstrument",
]

Results = list[tuple[Callable[..., t.Any], t.Any]]
Wrapper = Callable[[Callable[..., t.Any]], Callable[..., t.Any]]
_recording_parent = tracing.recording_parent
# Typed for the one key read through it: SPAN_KEY holds a Span.
_current_context = t.cast("Callable[[], dict[str, Span]]", tracing.current_context)
_SPAN_KEY = tracing.SPAN_KEY

_lock = threading.RLock()
_refcount = 0
_active: Instrumentation | None = None
_tracing = False  # _active has a tracer: sends check for a recording parent
_root_spans = False  # _active makes root spans for sends outside any span
_originals: dict[str, t.Any] = {}
_probes: dict[int, SignalProbe] = {}  # id(signal) -> probe; cleaned by weakref callback
_probes_get = _probes.get
_probe_refs: dict[int, weakref.ref[Signal]] = {}
_hooks: dict[int, Hooks] = {}
_seen_signals: weakref.WeakSet[Signal] = weakref.WeakSet()


def _new_probe(signal: Signal, sender: t.Any) -> SignalProbe:
    """Bind a signal at its first send (under the lock: names are looked up once)."""
    with _lock:
        key = id(signal)
        found = _probes.get(key)
        if found is not None:
            return found
        active = _active
        if active is None:  # raced with uninstrument(): record nothing
            return DISABLED_PROBE
        try:
            probe = SignalProbe(naming.signal_name(signal, sender), active, _hooks.get(key))
        except Exception:
            internal_error("signal binding")
            # Unrecorded from now on, but sigtrace's request hooks keep running.
            probe = SignalProbe(naming.ANONYMOUS_SIGNAL, None, _hooks.get(key))

        def forget(_ref: weakref.ref[Signal], key: int = key) -> None:
            _probes.pop(key, None)
            _probe_refs.pop(key, None)

        try:
            _probe_refs[key] = weakref.ref(signal, forget)
        except TypeError:
            return probe  # not weakly referenceable: bound again at each send
        _probes[key] = probe
        _seen_signals.add(signal)
        return probe


# --------------------------------------------------------------------------
# The traced send (hot path)


def send(
    self: Signal,
    sender: t.Any | None = None,
    /,
    *,
    _async_wrapper: Wrapper | None = None,
    **kwargs: t.Any,
) -> Results:
    """blinker's ``Signal.send``, recording metrics and spans (see module doc).

    The common case (a recorded signal, no span to make, sigtrace's own
    histograms) runs here, with nothing allocated beyond blinker's own results
    and one C call per observation; the rest goes to :func:`_send_general`.
    """
    if self.is_muted:
        return []
    probe = _probes_get(id(self)) or _new_probe(self, sender)
    if not probe.lean:  # hooks, excluded, metrics off or multiprocess
        return _send_general(self, probe, sender, _async_wrapper, kwargs)
    probe.count_send()
    if not self.receivers:
        return []
    if _tracing and (
        _root_spans  # tracing.recording_parent(), inlined:
        or ((span := _current_context().get(_SPAN_KEY)) is not None and span.is_recording())
    ):
        return _send_general(self, probe, sender, _async_wrapper, kwargs, counted=True)
    results: Results = []
    bound = probe.by_identity
    started = ended = 0.0
    try:
        for receiver in self.receivers_for(sender):
            receiver_probe, is_coroutine, add = bound.get(id(receiver)) or probe.lookup(receiver)
            if is_coroutine:  # _sync_callable(), inlined
                if _async_wrapper is None:
                    raise RuntimeError("Cannot send to a coroutine function.")
                call = _async_wrapper(receiver)
            else:
                call = receiver
            call_started = perf_counter()
            if not started:
                started = call_started
            try:
                result = call(sender, **kwargs)
            except BaseException as exc:
                receiver_probe.record(perf_counter() - call_started, None, exc)
                raise
            ended = perf_counter()
            try:
                add(ended - call_started)  # type: ignore[misc]  # lean: never None
            except Exception:
                internal_error("receiver metrics")
            results.append((receiver, result))
    except BaseException as exc:
        if started:
            probe.finish(started, None, exc)
        raise
    if started:  # the signal's time: first receiver's start to last one's end
        try:
            probe.add(ended - started)  # type: ignore[misc]
        except Exception:
            internal_error("signal metrics")
    return results


def _send_general(
    self: Signal,
    probe: SignalProbe,
    sender: t.Any,
    _async_wrapper: Wrapper | None,
    kwargs: dict[str, t.Any],
    counted: bool = False,
) -> Results:
    """The traced send with hooks, spans, exclusion or prometheus-client's metrics."""
    hooks = probe.hooks  # sigtrace's own request timing, on Flask's request signals
    if hooks is not None:
        _run_hook(hooks.before, sender, kwargs)
    try:
        if not self.receivers:
            probe.count_send()
            return []
        if not probe.enabled:
            return _originals["send"](self, sender, _async_wrapper=_async_wrapper, **kwargs)  # type: ignore[no-any-return]
        if not counted:
            probe.count_send()
        results: Results = []
        bound = probe.by_identity
        started = 0.0
        spans: SendSpans | None = None
        try:
            for receiver in self.receivers_for(sender):
                if not started:  # the first receiver: a send worth timing and tracing
                    if _tracing and (_root_spans or _recording_parent()):
                        spans = SendSpans.open(_active, probe, sender, kwargs)
                    started = perf_counter()
                receiver_probe, is_coroutine, _ = bound.get(id(receiver)) or probe.lookup(receiver)
                call = _sync_callable(receiver, is_coroutine, _async_wrapper)
                if spans is not None:
                    result = spans.call(receiver_probe, call, sender, kwargs)
                else:
                    call_started = perf_counter()
                    try:
                        result = call(sender, **kwargs)
                    except BaseException as exc:
                        receiver_probe.record(perf_counter() - call_started, None, exc)
                        raise
                    receiver_probe.record(perf_counter() - call_started, None, None)
                results.append((receiver, result))
        except BaseException as exc:
            if started:
                probe.finish(started, spans, exc)
            raise
        if started:
            probe.finish(started, spans, None)
        return results
    finally:
        if hooks is not None:
            _run_hook(hooks.after, sender, kwargs)


async def send_async(
    self: Signal,
    sender: t.Any | None = None,
    /,
    *,
    _sync_wrapper: Wrapper | None = None,
    **kwargs: t.Any,
) -> Results:
    """blinker's ``Signal.send_async``, recording metrics and spans (mirrors :func:`send`)."""
    if self.is_muted:
        return []
    probe = _probes_get(id(self)) or _new_probe(self, sender)
    if not self.receivers:
        probe.count_send()
        return []
    if not probe.enabled:
        return await _originals["send_async"](self, sender, _sync_wrapper=_sync_wrapper, **kwargs)  # type: ignore[no-any-return]
    probe.count_send()
    results: Results = []
    bound = probe.by_identity
    started = 0.0
    spans: SendSpans | None = None
    try:
        for receiver in self.receivers_for(sender):
            if not started:
                if _tracing and (_root_spans or _recording_parent()):
                    spans = SendSpans.open(_active, probe, sender, kwargs)
                started = perf_counter()
            receiver_probe, is_coroutine, _ = bound.get(id(receiver)) or probe.lookup(receiver)
            if not is_coroutine:
                if _sync_wrapper is None:
                    raise RuntimeError("Cannot send to a non-coroutine function.")
                call = _sync_wrapper(receiver)
            else:
                call = receiver
            if spans is not None:
                result = await spans.await_call(receiver_probe, call, sender, kwargs)
            else:
                call_started = perf_counter()
                try:
                    result = await call(sender, **kwargs)
                except BaseException as exc:
                    receiver_probe.record(perf_counter() - call_started, None, exc)
                    raise
                receiver_probe.record(perf_counter() - call_started, None, None)
            results.append((receiver, result))
    except BaseException as exc:
        if started:
            probe.finish(started, spans, exc)
        raise
    if started:
        probe.finish(started, spans, None)
    return results


def _sync_callable(receiver: t.Any, is_coroutine: bool, async_wrapper: Wrapper | None) -> t.Any:
    """What ``send`` calls for ``receiver``: blinker's rule, with blinker's error."""
    if not is_coroutine:
        return receiver
    if async_wrapper is None:
        raise RuntimeError("Cannot send to a coroutine function.")
    return async_wrapper(receiver)


def _run_hook(hook: t.Any, sender: t.Any, kwargs: dict[str, t.Any]) -> None:
    if hook is None:
        return
    try:
        hook(sender, kwargs)
    except Exception:
        internal_error(getattr(hook, "__qualname__", "hook"))


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
    global _refcount, _active, _tracing, _root_spans
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
        _active = Instrumentation(
            registry, tracer_provider, metrics, tracing_enabled, spans, root_spans,
            include, exclude, record_kwargs, buckets, max_label_values,
        )  # fmt: skip
        _tracing = _active.tracer is not None
        _root_spans = _tracing and _active.root_spans
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
    global _refcount, _active, _tracing, _root_spans
    with _lock:
        if _refcount == 0:
            return
        _refcount -= 1
        if _refcount:
            return
        Signal.send = _originals.pop("send")  # type: ignore[method-assign]
        Signal.send_async = _originals.pop("send_async")  # type: ignore[method-assign]
        _active = None
        _tracing = _root_spans = False
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
            probe.set_hooks(hooks)


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
