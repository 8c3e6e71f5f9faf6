"""The spans of one traced send: under the recording parent the send found, or a root.

The send (:mod:`sigtrace.dispatch`) checks for a recording parent once, at its
first receiver, and only then opens a :class:`SendSpans`: the signal span
(started there, so a send that reaches nobody makes no span), one span per
receiver around the call (awaited work included), and the exemplar that links
the send's recorded durations to the trace. The send records every duration
itself; this module only adds spans and exemplars, and swallows its own faults.
"""

from __future__ import annotations

import typing as t
import weakref
from contextvars import Token
from time import time_ns

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span

from . import lifecycle, tracing
from .bindings import ReceiverBinding, SignalBinding, exemplar_of
from .faults import internal_error

__all__ = ["DeferredSpan", "SendSpans", "SlowSendSpans", "SpanSettings"]

_FlaskApp: type[t.Any]
try:  # Flask apps as senders get their name on signal spans.
    from flask.sansio.app import App as _FlaskApp
except ImportError:  # pragma: no cover - flask is a dependency
    _FlaskApp = type(None)


_VAR = tracing.CONTEXT_VAR
_SPAN_KEY = tracing.SPAN_KEY


def _make_current(span: Span) -> Token[Context]:
    """``context.attach(trace.set_span_in_context(span))``: straight through the
    ContextVar with the default runtime context (see :data:`tracing.CONTEXT_VAR`)."""
    if _VAR is not None:
        return _VAR.set(Context({**_VAR.get(), _SPAN_KEY: span}))
    return otel_context.attach(trace.set_span_in_context(span))


def _restore(token: Token[Context]) -> None:
    """``context.detach(token)``, the same way."""
    if _VAR is not None:
        _VAR.reset(token)
    else:
        otel_context.detach(token)


Entered = t.Union[tuple[Span, Token[Context]], "DeferredSpan", None]
"""What a receiver's call runs under: its span and the token that made it current,
a deferred span (``slow``, which keeps its own token), or None (no receiver span)."""


class SpanSettings(t.NamedTuple):
    """What the active instrumentation says about spans."""

    tracer: trace.Tracer
    signal_spans: bool
    receiver_spans: bool
    root_spans: bool
    record_kwargs: frozenset[str]
    slow_threshold: float | None = None  # ``slow``: seconds a span must take to be kept


def _signal_attributes(
    settings: SpanSettings, binding: SignalBinding, sender: t.Any, kwargs: dict[str, t.Any]
) -> t.Mapping[str, t.Any]:
    """The signal span's attributes: the signal's, the Flask app's name, allowed kwargs."""
    is_app = isinstance(sender, _FlaskApp)
    if not settings.record_kwargs:
        if not is_app:
            return binding.attributes
        cached = binding.app_attributes
        if cached is not None and cached[0]() is sender:
            return cached[1]  # the SDK copies attributes: one dict serves every send
    attributes = dict(binding.attributes)
    if is_app:
        attributes[tracing.ATTR_APP_NAME] = str(sender.name)
    if settings.record_kwargs:
        attributes.update(tracing.kwarg_attributes(settings.record_kwargs, kwargs))
    elif is_app:
        binding.app_attributes = (weakref.ref(sender), attributes)
    return attributes


class SendSpans:
    """The spans and the exemplar of one traced send."""

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
        settings: SpanSettings,
        binding: SignalBinding,
        parent: Span | None,
        sender: t.Any,
        kwargs: dict[str, t.Any],
    ) -> SendSpans | SlowSendSpans | None:
        """The spans of a send under ``parent``, the recording span the send found
        (None: a root send, with root spans on); None if they cannot be made."""
        if settings.slow_threshold is not None:
            return SlowSendSpans.open(settings, binding, parent, sender, kwargs)
        try:
            spans = SendSpans(settings.tracer, None if parent is None else exemplar_of(parent))
            spans.with_receivers = settings.receiver_spans
            if settings.signal_spans:
                spans._start_signal_span(settings, binding, sender, kwargs)
            return spans
        except Exception:
            internal_error("signal span start")
            return None

    def _start_signal_span(
        self,
        settings: SpanSettings,
        binding: SignalBinding,
        sender: t.Any,
        kwargs: dict[str, t.Any],
    ) -> None:
        span = self.tracer.start_span(
            binding.span_name,
            kind=tracing.INTERNAL,
            attributes=_signal_attributes(settings, binding, sender, kwargs),
        )
        self.span = span
        self.token = _make_current(span)
        if self.exemplar is None:
            self.exemplar = exemplar_of(span)

    def enter(self, binding: ReceiverBinding) -> Entered:
        """Before a receiver's call: its span, made current (when receiver spans are on)."""
        self.called += 1
        if not self.with_receivers:
            return None
        try:
            span = self.tracer.start_span(
                binding.span_name, kind=tracing.INTERNAL, attributes=binding.attributes
            )
            return span, _make_current(span)
        except Exception:
            internal_error("receiver span start")
            return None

    def leave(
        self, binding: ReceiverBinding, entered: Entered, elapsed: float, exc: BaseException | None
    ) -> None:
        """After the call (its duration already recorded): the span's end, the exemplar."""
        try:
            if entered is not None:
                span, token = entered  # type: ignore[misc]  # what enter() made: a pair
                _restore(token)
                if exc is not None:
                    tracing.mark_error(span, exc)
                span.end()
            if self.exemplar is not None:
                binding.exemplify(elapsed, self.exemplar)
        except Exception:
            internal_error("receiver span end")

    def finish(self, binding: SignalBinding, elapsed: float, exc: BaseException | None) -> None:
        """After the send (its duration already recorded): the signal span's end, the exemplar."""
        try:
            span = self.span
            if span is not None:
                if self.token is not None:
                    _restore(self.token)
                span.set_attribute(tracing.ATTR_RECEIVERS_CALLED, self.called)
                if exc is not None:
                    tracing.mark_error(span, exc)
                span.end()
            if self.exemplar is not None:
                binding.exemplify(elapsed, self.exemplar)
        except Exception:
            internal_error("signal span end")


# --------------------------------------------------------------------------
# ``slow``: spans made after the fact, for what was slow, failed or had children

# Held while a deferred span is made or ended: a receiver may hand its context
# to another thread, whose child span can make it while the send ends it.
_deferred_lock = lifecycle.ForkSafeLock(reentrant=True)  # a forked child gets a new one


class DeferredSpan(Span):
    """A span that sigtrace makes with the SDK only once it knows it must export it.

    Under ``slow`` it stands, in the context, where ``all`` puts a receiver's
    span, and in a nested send's parent chain where ``all`` has the signal span.
    It reports itself recording, as that span would. The real span is made
    (with the start time this one took, under its parent, made first) when the
    send finds the call slow or failed, or as soon as anyone asks for its
    identity (``get_span_context``: what a tracer does to start a child, on any
    provider, and what a propagator does to inject it), so that no child is
    left without its parent. Changes made to it before then (attributes,
    events, status, name) are kept and applied if the span is made, as ``all``
    would have them; dropped with it otherwise. OpenTelemetry offers no span
    whose creation can be decided after the fact, hence this class.
    """

    # No __slots__: the fields most spans never change are class attributes, so
    # that making one (for every receiver call) stores five fields, not eleven.
    span: Span | None = None  # the real span, once made
    elapsed: float | None = None  # set when the call ended unexported
    called: int | None = None  # a signal span's blinker.receivers.called
    closed = False
    pending: list[tuple[str, tuple[t.Any, ...]]] | None = None  # changes made before it was
    token: Token[Context] | None = None  # the context it was made current in, if any

    def __init__(
        self,
        tracer: trace.Tracer,
        name: str,
        attributes: t.Mapping[str, t.Any],
        parent: Span | None,
        start_ns: int,
    ) -> None:
        self.tracer = tracer
        self.name = name
        self.attributes = attributes
        self.parent = parent  # a real span, another DeferredSpan, or None for a root
        self.start_ns = start_ns

    def made(self) -> Span:
        """The real span, made now if it was not (its parents first); ended, if the
        call has ended meanwhile (a child started late, or from another thread)."""
        with _deferred_lock:
            span = self._make()
            if self.elapsed is not None and not self.closed:  # ended before it was made
                self._end(span, None, self.start_ns + int(self.elapsed * 1e9) + 1)
            return span

    def _make(self) -> Span:
        span = self.span
        if span is None:
            parent = self.parent
            if isinstance(parent, DeferredSpan):
                parent = parent.made()
            span = self.tracer.start_span(
                self.name,
                context=trace.set_span_in_context(parent or trace.INVALID_SPAN, Context()),
                kind=tracing.INTERNAL,
                attributes=self.attributes,
                start_time=self.start_ns,
            )
            for method, args in self.pending or ():
                getattr(span, method)(*args)
            self.pending = None
            self.span = span
        return span

    def close(self, exc: BaseException | None, end_ns: int) -> Span:
        """Make (if need be) and end the span of a call that ended at ``end_ns``."""
        with _deferred_lock:
            span = self._make()
            if not self.closed:
                self._end(span, exc, end_ns)
            return span

    def _end(self, span: Span, exc: BaseException | None, end_ns: int) -> None:
        self.closed = True
        if self.called is not None:
            span.set_attribute(tracing.ATTR_RECEIVERS_CALLED, self.called)
        if exc is not None:
            tracing.mark_error(span, exc)
        span.end(end_time=max(end_ns, time_ns()) if exc is not None else end_ns)

    def exported(self) -> Span | None:
        """The real span of this or the nearest ancestor that has one (made or not deferred)."""
        span: Span | None = self
        while isinstance(span, DeferredSpan):
            span = span.span if span.span is not None else span.parent
        return span

    def _apply(self, method: str, *args: t.Any) -> None:
        with _deferred_lock:
            if self.span is not None:
                getattr(self.span, method)(*args)
            elif not self.closed and self.elapsed is None:
                if self.pending is None:
                    self.pending = []
                self.pending.append((method, args))

    # The Span API: what other code may do with the current span.

    def get_span_context(self) -> trace.SpanContext:
        try:
            return self.made().get_span_context()
        except Exception:
            internal_error("deferred span")
            return trace.INVALID_SPAN_CONTEXT

    def is_recording(self) -> bool:
        return not self.closed and self.elapsed is None

    def end(self, end_time: int | None = None) -> None:
        return None  # sigtrace ends it: the call's end is the span's

    def set_attribute(self, key: str, value: t.Any) -> None:
        self._apply("set_attribute", key, value)

    def set_attributes(self, attributes: t.Mapping[str, t.Any]) -> None:
        self._apply("set_attributes", dict(attributes))

    def add_event(
        self,
        name: str,
        attributes: t.Mapping[str, t.Any] | None = None,
        timestamp: int | None = None,
    ) -> None:
        self._apply("add_event", name, attributes, timestamp or time_ns())

    def add_link(
        self, context: trace.SpanContext, attributes: t.Mapping[str, t.Any] | None = None
    ) -> None:
        self._apply("add_link", context, attributes)

    def update_name(self, name: str) -> None:
        self._apply("update_name", name)

    def set_status(
        self, status: trace.Status | trace.StatusCode, description: str | None = None
    ) -> None:
        self._apply("set_status", status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: t.Mapping[str, t.Any] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self._apply("record_exception", exception, attributes, timestamp or time_ns(), escaped)


def _exemplar(span: Span | None) -> dict[str, str] | None:
    return None if span is None else exemplar_of(span)


class SlowSendSpans:
    """The spans of one send under ``slow``: decided when each call has ended.

    A receiver span is exported when the call took at least the threshold,
    raised, or had a span started under it; the signal span when the send took
    at least the threshold or has an exported receiver span. Exported spans are
    those ``all`` makes (name, kind, attributes, status, events, parents), with
    times that bracket the call. Exemplars name the exported span of the
    observation, else its nearest exported ancestor known when the call ends.
    """

    __slots__ = ("called", "exemplar", "scope", "threshold", "tracer")

    def __init__(self, tracer: trace.Tracer, scope: DeferredSpan, threshold: float) -> None:
        self.tracer = tracer
        self.scope = scope
        self.threshold = threshold
        self.called = 0
        # The nearest span above the send sure to be exported, as an exemplar.
        self.exemplar = _exemplar(
            scope.parent.exported() if isinstance(scope.parent, DeferredSpan) else scope.parent
        )

    @staticmethod
    def open(
        settings: SpanSettings,
        binding: SignalBinding,
        parent: Span | None,
        sender: t.Any,
        kwargs: dict[str, t.Any],
    ) -> SlowSendSpans | None:
        try:
            attributes = _signal_attributes(settings, binding, sender, kwargs)
            scope = DeferredSpan(settings.tracer, binding.span_name, attributes, parent, time_ns())
            return SlowSendSpans(settings.tracer, scope, t.cast(float, settings.slow_threshold))
        except Exception:
            internal_error("signal span start")
            return None

    def enter(self, binding: ReceiverBinding) -> Entered:
        """Before a receiver's call: a deferred span, made current."""
        self.called += 1
        try:
            deferred = DeferredSpan(
                self.tracer, binding.span_name, binding.attributes, self.scope, time_ns()
            )
            if _VAR is not None:  # _make_current(), inlined: this runs for every receiver
                deferred.token = _VAR.set(Context({**_VAR.get(), _SPAN_KEY: deferred}))
            else:
                deferred.token = _make_current(deferred)
            return deferred
        except Exception:
            internal_error("receiver span start")
            return None

    def leave(
        self, binding: ReceiverBinding, entered: Entered, elapsed: float, exc: BaseException | None
    ) -> None:
        """After the call: export its span if it must be, and the exemplar."""
        if entered is None:
            return
        deferred: DeferredSpan = entered  # type: ignore[assignment]  # what enter() made
        try:
            if _VAR is not None:  # _restore(), inlined
                _VAR.reset(deferred.token)  # type: ignore[arg-type]
            else:
                _restore(t.cast(Token[Context], deferred.token))
            if exc is None and elapsed < self.threshold:
                # First: a span made from now on (a late child) ends itself.
                deferred.elapsed = elapsed
                if deferred.span is None:  # fast, no child: not exported
                    scope_span = self.scope.span
                    exemplar = self.exemplar if scope_span is None else exemplar_of(scope_span)
                    if exemplar is not None:
                        binding.exemplify(elapsed, exemplar)
                    return
            exemplar = exemplar_of(deferred.close(exc, time_ns()))
            if exemplar is not None:
                binding.exemplify(elapsed, exemplar)
        except Exception:
            internal_error("receiver span end")

    def finish(self, binding: SignalBinding, elapsed: float, exc: BaseException | None) -> None:
        """After the send: export its span if it must be, and the exemplar."""
        scope = self.scope
        try:
            scope.called = self.called
            if exc is None and elapsed < self.threshold:
                scope.elapsed = elapsed
                if scope.span is None:  # fast, no exported receiver span: not exported
                    exemplar = self.exemplar
                    if exemplar is not None:
                        binding.exemplify(elapsed, exemplar)
                    return
            exemplar = exemplar_of(scope.close(exc, time_ns()))
            if exemplar is not None:
                binding.exemplify(elapsed, exemplar)
        except Exception:
            internal_error("signal span end")
