"""The patch: the only code that reads or replaces blinker's internals.

:func:`instrument` replaces ``blinker.Signal.send`` and ``Signal.send_async``
at class level with :func:`send` / :func:`send_async`, copies of blinker's
loops that record what :mod:`sigtrace.bindings` bound for the signal and its
receivers. They do what blinker's do, in the same order and nothing more with
the signal object: read ``is_muted``, iterate ``receivers_for(sender)``, call
each receiver (through ``_async_wrapper`` / ``_sync_wrapper`` for the other
colour, with blinker's own errors), return ``[(receiver, result), ...]`` and
let any exception through as the same object. The signal is never hashed or
compared: bindings are cached by ``id`` under a weak reference, and a signal
that can't be weakly referenced is recorded under a name looked up per send.

All state of the active instrumentation is one :class:`Active` object in
``_active``, replaced whole under ``_lock``; a send reads it once, so a send
racing :func:`uninstrument` finishes as the send it started as. See
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import inspect
import logging
import typing as t
import weakref
from collections.abc import Callable
from time import perf_counter

from blinker import ANY, Signal
from blinker.base import ANY_ID
from opentelemetry.trace import INVALID_SPAN, Span

from . import lifecycle, naming, tracing
from .bindings import SignalBinding, records_signal, unrecorded
from .faults import internal_error
from .identity import IdentityCache
from .metrics import TALLIER, MetricSet, metric_set
from .options import Options
from .spans import SendSpans, SlowSendSpans, SpanSettings
from .version import __version__

__all__ = [
    "Options",
    "instrument",
    "is_instrumented",
    "uninstrument",
]

log = logging.getLogger("sigtrace")

UNKNOWN_SENDER = object()
"""What :func:`connections` gives for a sender it could not resolve."""

Results = list[tuple[Callable[..., t.Any], t.Any]]
Wrapper = Callable[[Callable[..., t.Any]], Callable[..., t.Any]]
# Typed for the one key read through it: SPAN_KEY holds a Span.
_current_context = t.cast("Callable[[], dict[str, Span]]", tracing.current_context)
_SPAN_KEY = tracing.SPAN_KEY


class Active:
    """The active instrumentation: its options, metrics, spans and bindings."""

    def __init__(self, options: Options, blinker_send: t.Any, blinker_send_async: t.Any) -> None:
        self.options = options
        self.users = 1  # instrument() calls not yet matched by uninstrument()
        self.patched = False
        self.blinker_send = blinker_send
        self.blinker_send_async = blinker_send_async
        self.metrics: MetricSet | None = (
            metric_set(options.registry, options.buckets, options.max_label_values)
            if options.metrics
            else None
        )
        self.spans: SpanSettings | None = None
        if options.tracing_enabled:  # "none": no span, but the parent's exemplar
            self.spans = SpanSettings(
                tracing.get_tracer(options.tracer_provider),
                options.spans in ("all", "signals", "slow"),
                options.spans in ("all", "receivers", "slow"),
                options.root_spans,
                options.record_kwargs,
                options.slow_threshold if options.spans == "slow" else None,
            )
        self.root_spans = options.root_spans
        self.signals: IdentityCache[SignalBinding] = IdentityCache()
        self.binding_of = self.signals.get  # the send's lookup: binding_of(id(signal))
        # Signals that can't be weakly referenced: bound again by name at each send.
        self.by_name: dict[str, SignalBinding] = {}
        # Signals left anonymous at their first send, and the sender types that
        # were looked through for their name since.
        self.anonymous: IdentityCache[tuple[SignalBinding, weakref.WeakSet[type]]] = IdentityCache()


_lock = lifecycle.ForkSafeLock(reentrant=True)  # a forked child gets a new one
_active: Active | None = None


# --------------------------------------------------------------------------
# The traced send


def send(
    self: Signal,
    sender: t.Any | None = None,
    /,
    *,
    _async_wrapper: Wrapper | None = None,
    **kwargs: t.Any,
) -> Results:
    """blinker's ``Signal.send``, recording metrics and spans (see the module doc)."""
    if self.is_muted:
        return []
    active = _active
    if active is None:  # raced with the last uninstrument(): blinker's own send
        return _blinker_send(self, sender, _async_wrapper, kwargs)
    binding = active.binding_of(id(self)) or _bind(active, self, sender)
    if not binding.recorded:
        return active.blinker_send(self, sender, _async_wrapper=_async_wrapper, **kwargs)  # type: ignore[no-any-return]
    binding.count_send()
    if binding.plain_receivers and not self.receivers:
        return []  # what blinker's own receivers_for starts with
    results: Results = []
    spans: SendSpans | SlowSendSpans | None = None
    started = ended = 0.0
    try:
        for receiver in self.receivers_for(sender):
            receiver_binding, is_coroutine, record = binding.bound(id(receiver)) or binding.lookup(
                receiver
            )
            if is_coroutine:
                if _async_wrapper is None:
                    raise RuntimeError("Cannot send to a coroutine function.")
                call = _async_wrapper(receiver)
            else:
                call = receiver
            if not started:  # the first receiver: the one check for a recording parent
                if active.spans is not None:
                    parent = _current_context().get(_SPAN_KEY)
                    if parent is not None and parent.is_recording():
                        spans = SendSpans.open(active.spans, binding, parent, sender, kwargs)
                    elif active.root_spans and (parent is None or parent is INVALID_SPAN):
                        spans = SendSpans.open(active.spans, binding, None, sender, kwargs)
                started = perf_counter()
            if spans is None:
                call_started = perf_counter()
                try:
                    result = call(sender, **kwargs)
                except BaseException as exc:
                    record(perf_counter() - call_started)
                    receiver_binding.count_error(exc)
                    raise
                ended = perf_counter()
                record(ended - call_started)
            else:  # the same, inside the receiver's span
                entered = spans.enter(receiver_binding)
                call_started = perf_counter()
                try:
                    result = call(sender, **kwargs)
                except BaseException as exc:
                    elapsed = perf_counter() - call_started
                    record(elapsed)
                    receiver_binding.count_error(exc)
                    spans.leave(receiver_binding, entered, elapsed, exc)
                    raise
                ended = perf_counter()
                record(ended - call_started)
                spans.leave(receiver_binding, entered, ended - call_started, None)
            results.append((receiver, result))
    except BaseException as exc:
        if started:
            elapsed = perf_counter() - started
            binding.record(elapsed)
            if spans is not None:
                spans.finish(binding, elapsed, exc)
        raise
    if started:  # the signal's time: first receiver's start to last one's end
        binding.record(ended - started)
        if spans is not None:
            spans.finish(binding, ended - started, None)
    return results


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
    active = _active
    if active is None:
        return await _blinker_send_async(self, sender, _sync_wrapper, kwargs)
    binding = active.binding_of(id(self)) or _bind(active, self, sender)
    if not binding.recorded:
        return await active.blinker_send_async(  # type: ignore[no-any-return]
            self, sender, _sync_wrapper=_sync_wrapper, **kwargs
        )
    binding.count_send()
    if binding.plain_receivers and not self.receivers:
        return []  # what blinker's own receivers_for starts with
    results: Results = []
    spans: SendSpans | SlowSendSpans | None = None
    started = ended = 0.0
    try:
        for receiver in self.receivers_for(sender):
            receiver_binding, is_coroutine, record = binding.bound(id(receiver)) or binding.lookup(
                receiver
            )
            if not is_coroutine:
                if _sync_wrapper is None:
                    raise RuntimeError("Cannot send to a non-coroutine function.")
                call = _sync_wrapper(receiver)
            else:
                call = receiver
            if not started:
                if active.spans is not None:
                    parent = _current_context().get(_SPAN_KEY)
                    if parent is not None and parent.is_recording():
                        spans = SendSpans.open(active.spans, binding, parent, sender, kwargs)
                    elif active.root_spans and (parent is None or parent is INVALID_SPAN):
                        spans = SendSpans.open(active.spans, binding, None, sender, kwargs)
                started = perf_counter()
            if spans is None:
                call_started = perf_counter()
                try:
                    result = await call(sender, **kwargs)
                except BaseException as exc:
                    record(perf_counter() - call_started)
                    receiver_binding.count_error(exc)
                    raise
                ended = perf_counter()
                record(ended - call_started)
            else:  # the same, inside the receiver's span
                entered = spans.enter(receiver_binding)
                call_started = perf_counter()
                try:
                    result = await call(sender, **kwargs)
                except BaseException as exc:
                    elapsed = perf_counter() - call_started
                    record(elapsed)
                    receiver_binding.count_error(exc)
                    spans.leave(receiver_binding, entered, elapsed, exc)
                    raise
                ended = perf_counter()
                record(ended - call_started)
                spans.leave(receiver_binding, entered, ended - call_started, None)
            results.append((receiver, result))
    except BaseException as exc:
        if started:
            elapsed = perf_counter() - started
            binding.record(elapsed)
            if spans is not None:
                spans.finish(binding, elapsed, exc)
        raise
    if started:
        binding.record(ended - started)
        if spans is not None:
            spans.finish(binding, ended - started, None)
    return results


# blinker's functions as found by the first instrument(); kept after the last
# uninstrument() for sends that were already inside the patched function.
_blinker_functions: dict[str, t.Any] = {}


def _blinker_send(self: Signal, sender: t.Any, wrapper: Wrapper | None, kwargs: t.Any) -> Results:
    return _blinker_functions["send"](self, sender, _async_wrapper=wrapper, **kwargs)  # type: ignore[no-any-return]


async def _blinker_send_async(
    self: Signal, sender: t.Any, wrapper: Wrapper | None, kwargs: t.Any
) -> Results:
    return await _blinker_functions["send_async"](self, sender, _sync_wrapper=wrapper, **kwargs)  # type: ignore[no-any-return]


def _bind(active: Active, signal: Signal, sender: t.Any) -> SignalBinding:
    """The signal's binding at its first send (or at each, if it can't be cached).

    A signal whose name was not found at its first send is recorded as
    ``anonymous`` until a later send's sender class reveals its attribute.
    """
    name: str | None = None
    provisional = active.anonymous.get(id(signal))
    if provisional is not None:
        binding, tried = provisional
        name = naming.later_signal_name(signal, sender, tried)
        if name is None:
            return binding
    with _lock:
        found = active.signals.get(id(signal))
        if found is not None:
            return found
        if name is None:
            try:
                name = naming.signal_name(signal, sender)
            except Exception:
                internal_error("signal naming")
                name = naming.ANONYMOUS_SIGNAL
        plain = _plain_receivers(type(signal))
        reused = active.by_name.get(name)
        if reused is not None:
            binding = reused
        else:
            try:
                recorded = records_signal(name, active.options.include, active.options.exclude)
                binding = SignalBinding(name, recorded, active.metrics)
            except Exception:
                internal_error("signal binding")
                binding = unrecorded(name)  # unrecorded from now on
        try:
            if name == naming.ANONYMOUS_SIGNAL:
                cached = active.anonymous.put(signal, (binding, weakref.WeakSet()))
            else:
                cached = active.signals.put(signal, binding)
        except Exception:  # a signal whose __weakref__ misbehaves
            cached = False
        if cached:
            binding.plain_receivers = plain
        else:  # looked up by name at each send, shared by signals of any class
            active.by_name[name] = binding
        return binding


def _plain_receivers(kind: type) -> bool:
    """Whether signals of ``kind`` find receivers exactly as blinker's ``Signal`` does.

    Then an empty ``receivers`` means ``receivers_for`` yields nothing (it is
    the first thing it checks), and the send can stop there. A subclass that
    overrides ``receivers_for``, ``receivers`` or attribute access gets the
    full loop.
    """
    try:
        return (
            getattr(kind, "receivers_for", None) is Signal.receivers_for
            and getattr(kind, "__getattribute__", None) is Signal.__getattribute__
            and not any("receivers" in vars(klass) for klass in kind.__mro__)
        )
    except Exception:
        return False


# --------------------------------------------------------------------------
# Installing and removing the patch


def _same_shape(blinker_function: t.Any, ours: t.Any) -> bool:
    """Whether blinker's function takes exactly the parameters ours was written for."""

    def shape(function: t.Any) -> list[tuple[str, t.Any, t.Any]]:
        parameters = inspect.signature(function).parameters.values()
        return [(p.name, p.kind, p.default) for p in parameters]

    try:
        return shape(blinker_function) == shape(ours)
    except (TypeError, ValueError):
        return False


def instrument(options: Options | None = None, /, **fields: t.Any) -> None:
    """Trace every blinker ``Signal.send`` and ``send_async`` in the process.

    Takes an :class:`~sigtrace.options.Options` or its fields as keywords.
    Reference-counted: each call must be matched by one :func:`uninstrument`.
    The first call's options hold until the last ``uninstrument()``; a later
    call with different options raises :class:`ValueError` naming the first
    option that differs, since signals are process-wide.

    If blinker's ``send`` / ``send_async`` do not have the signature sigtrace
    was written for (a blinker release that changed them), one warning is
    logged and blinker is left unpatched: the app runs, unrecorded.
    """
    global _active
    if options is None:
        options = Options(**fields)
    elif fields:
        raise TypeError("pass an Options object or keyword options, not both")
    with _lock:
        if _active is not None:
            differs = _active.options.first_difference(options)
            if differs is not None:
                raise ValueError(
                    f"sigtrace is already instrumented with another {differs} "
                    f"(was {getattr(_active.options, differs)!r}, "
                    f"this call {getattr(options, differs)!r}); "
                    "call sigtrace.uninstrument() first or pass the same options"
                )
            _active.users += 1
            return
        blinker_send = Signal.__dict__["send"]
        blinker_send_async = Signal.__dict__["send_async"]
        active = Active(options, blinker_send, blinker_send_async)
        lifecycle.acquire(TALLIER)  # released by the last uninstrument()
        if _same_shape(blinker_send, send) and _same_shape(blinker_send_async, send_async):
            _blinker_functions.update(send=blinker_send, send_async=blinker_send_async)
            _active = active
            Signal.send = send  # type: ignore[method-assign]
            Signal.send_async = send_async  # type: ignore[method-assign]
            active.patched = True
        else:
            _active = active
            log.warning(
                "sigtrace: blinker's Signal.send or send_async does not have the signature "
                "sigtrace %s was written for (blinker changed them); signals are NOT "
                "recorded. Upgrade sigtrace or pin blinker to a release it supports.",
                __version__,
            )


def uninstrument() -> None:
    """Undo one :func:`instrument`; the last one restores blinker's functions.

    After it, ``Signal.send is`` the function that was there before the first
    ``instrument()``. Extra calls do nothing.
    """
    global _active
    with _lock:
        active = _active
        if active is None:
            return
        active.users -= 1
        if active.users:
            return
        if active.patched:
            Signal.send = active.blinker_send  # type: ignore[method-assign]
            Signal.send_async = active.blinker_send_async  # type: ignore[method-assign]
        _active = None
        lifecycle.release(TALLIER)


def is_instrumented() -> bool:
    """True between the first :func:`instrument` and the last :func:`uninstrument`."""
    return _active is not None


def active_metrics() -> MetricSet | None:
    """The metric set of the active instrumentation, if metrics are on."""
    active = _active
    return active.metrics if active is not None else None


def sent_signals() -> list[tuple[Signal, str]]:
    """Signals sent since instrumentation, with their labels (for the CLI)."""
    active = _active
    if active is None:
        return []
    return [(signal, binding.name) for signal, binding in active.signals.live()]


def label_of(signal: Signal) -> str | None:
    """The label a signal's metrics use, if it was sent while instrumented."""
    active = _active
    binding = active.signals.get(id(signal)) if active is not None else None
    return binding.name if binding is not None else None


def connections(signal: Signal) -> list[tuple[t.Any, bool, list[object]]]:
    """``(receiver, weak, senders)`` for each live receiver, in connection order.

    For the CLI. blinker has no public API for this, so it reads blinker's
    internals (1.9): ``receivers`` maps a receiver id to the receiver or
    a ``weakref.ref`` to it, ``_by_receiver`` maps it to the sender ids it is
    connected for (``ANY_ID`` for any sender; the value itself for str and int
    senders, see ``blinker._utilities.make_id``) and ``_weak_senders`` maps
    sender ids to weak references to the senders. Senders it cannot resolve
    (not weakly referenceable, or another blinker layout) come back as
    :data:`UNKNOWN_SENDER`.
    """
    by_receiver = getattr(signal, "_by_receiver", None)
    weak_senders = getattr(signal, "_weak_senders", {})
    out: list[tuple[t.Any, bool, list[object]]] = []
    for receiver_id, stored in list(signal.receivers.items()):
        weak = isinstance(stored, weakref.ref)
        receiver = stored() if isinstance(stored, weakref.ref) else stored
        if receiver is None:
            continue  # died; blinker removes it on its own
        if by_receiver is None:
            out.append((receiver, weak, [UNKNOWN_SENDER]))
            continue
        sender_ids = by_receiver.get(receiver_id)
        if not sender_ids:
            continue  # disconnected from its only sender: blinker keeps it, never calls it
        senders: list[object] = []
        for sender_id in sorted(sender_ids, key=repr):
            if sender_id == ANY_ID:
                senders.append(ANY)
            elif sender_id in weak_senders:
                sender = weak_senders[sender_id]()
                senders.append(UNKNOWN_SENDER if sender is None else sender)
            elif isinstance(sender_id, (str, int)):
                # An int is also what the id() of an unreferenceable sender
                # looks like; those are rare and shown as that number.
                senders.append(sender_id)
            else:
                senders.append(UNKNOWN_SENDER)
        out.append((receiver, weak, senders))
    return out
