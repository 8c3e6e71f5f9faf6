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
from contextvars import Token

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span

from . import tracing
from .bindings import ReceiverBinding, SignalBinding, exemplar_of
from .faults import internal_error

__all__ = ["SendSpans", "SpanSettings"]

_FlaskApp: type[t.Any]
try:  # Flask apps as senders get their name on signal spans.
    from flask.sansio.app import App as _FlaskApp
except ImportError:  # pragma: no cover - flask is a dependency
    _FlaskApp = type(None)


Entered = tuple[Span, Token[Context]] | None
"""A receiver's span and the token that made it current, or None (no receiver span)."""


class SpanSettings(t.NamedTuple):
    """What the active instrumentation says about spans."""

    tracer: trace.Tracer
    signal_spans: bool
    receiver_spans: bool
    root_spans: bool
    record_kwargs: frozenset[str]


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
    ) -> SendSpans | None:
        """The spans of a send under ``parent``, the recording span the send found
        (None: a root send, with root spans on); None if they cannot be made."""
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
        attributes = binding.attributes
        is_app = isinstance(sender, _FlaskApp)
        if settings.record_kwargs or is_app:
            attributes = dict(attributes)
            if is_app:
                attributes[tracing.ATTR_APP_NAME] = str(sender.name)
            attributes.update(tracing.kwarg_attributes(settings.record_kwargs, kwargs))
        span = self.tracer.start_span(
            binding.span_name, kind=tracing.INTERNAL, attributes=attributes
        )
        self.span = span
        self.token = otel_context.attach(trace.set_span_in_context(span))
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
            return span, otel_context.attach(trace.set_span_in_context(span))
        except Exception:
            internal_error("receiver span start")
            return None

    def leave(
        self, binding: ReceiverBinding, entered: Entered, elapsed: float, exc: BaseException | None
    ) -> None:
        """After the call (its duration already recorded): the exemplar, and the span's end."""
        if self.exemplar is not None:
            binding.exemplify(elapsed, self.exemplar)
        if entered is None:
            return
        span, token = entered
        try:
            otel_context.detach(token)
            if exc is not None:
                tracing.mark_error(span, exc)
            span.end()
        except Exception:
            internal_error("receiver span end")

    def finish(self, binding: SignalBinding, elapsed: float, exc: BaseException | None) -> None:
        """After the send (its duration already recorded): the exemplar, the signal span's end."""
        if self.exemplar is not None:
            binding.exemplify(elapsed, self.exemplar)
        span = self.span
        if span is None:
            return
        try:
            if self.token is not None:
                otel_context.detach(self.token)
            span.set_attribute(tracing.ATTR_RECEIVERS_CALLED, self.called)
            if exc is not None:
                tracing.mark_error(span, exc)
            span.end()
        except Exception:
            internal_error("signal span end")
