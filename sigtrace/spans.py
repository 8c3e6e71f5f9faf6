"""The spans of one send made under a recording parent (or as a root, if asked).

A :class:`SendSpans` exists only for such a send: the signal span (started at
the first receiver, so a send that reaches nobody makes no span), one span
per receiver around the call (awaited work included), and the exemplar that
the send's observations carry. Every method swallows its own faults.
"""

from __future__ import annotations

import typing as t
from collections.abc import Callable
from contextvars import Token
from time import perf_counter

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span

from . import tracing
from .bindings import ReceiverBinding, SignalBinding, exemplar_of
from .faults import internal_error

__all__ = ["SendSpans", "SpanSettings"]

_FlaskApp: type[t.Any]
try:  # Flask apps as senders get their name on signal spans.
    from flask.sansio.app import App as _FlaskApp
except ImportError:  # pragma: no cover - flask is a dependency
    _FlaskApp = type(None)


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
        sender: t.Any,
        kwargs: dict[str, t.Any],
    ) -> SendSpans | None:
        """The spans of a send, or None without a recording parent (and no root spans)."""
        try:
            parent = trace.get_current_span()
            if not parent.is_recording() and (
                parent is not INVALID_SPAN or not settings.root_spans
            ):
                return None
            spans = SendSpans(settings.tracer, exemplar_of(parent))
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

    def call(
        self,
        binding: ReceiverBinding,
        call: Callable[..., t.Any],
        sender: t.Any,
        kwargs: dict[str, t.Any],
    ) -> t.Any:
        """Run one receiver inside its span (when receiver spans are on)."""
        span, token = self._start_receiver(binding)
        started = perf_counter()
        try:
            result = call(sender, **kwargs)
        except BaseException as exc:
            self._end_receiver(binding, span, token, perf_counter() - started, exc)
            raise
        self._end_receiver(binding, span, token, perf_counter() - started, None)
        return result

    async def await_call(
        self,
        binding: ReceiverBinding,
        call: Callable[..., t.Any],
        sender: t.Any,
        kwargs: dict[str, t.Any],
    ) -> t.Any:
        """Await one receiver inside its span: the span covers the awaited work."""
        span, token = self._start_receiver(binding)
        started = perf_counter()
        try:
            result = await call(sender, **kwargs)
        except BaseException as exc:
            self._end_receiver(binding, span, token, perf_counter() - started, exc)
            raise
        self._end_receiver(binding, span, token, perf_counter() - started, None)
        return result

    def _start_receiver(
        self, binding: ReceiverBinding
    ) -> tuple[Span | None, Token[Context] | None]:
        self.called += 1
        if not self.with_receivers:
            return None, None
        try:
            span = self.tracer.start_span(
                binding.span_name, kind=tracing.INTERNAL, attributes=binding.attributes
            )
            return span, otel_context.attach(trace.set_span_in_context(span))
        except Exception:
            internal_error("receiver span start")
            return None, None

    def _end_receiver(
        self,
        binding: ReceiverBinding,
        span: Span | None,
        token: Token[Context] | None,
        elapsed: float,
        exc: BaseException | None,
    ) -> None:
        if exc is None:
            binding.observe(elapsed, self.exemplar)
        else:
            binding.failed(elapsed, exc, self.exemplar)
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

    def finish(self, binding: SignalBinding, elapsed: float, exc: BaseException | None) -> None:
        """Observe the send's duration with the exemplar and end the signal span."""
        binding.observe(elapsed, self.exemplar)
        span = self.span
        if span is None:
            return
        try:  # even when the metric failed: it detaches the context
            if self.token is not None:
                otel_context.detach(self.token)
            span.set_attribute(tracing.ATTR_RECEIVERS_CALLED, self.called)
            if exc is not None:
                tracing.mark_error(span, exc)
            span.end()
        except Exception:
            internal_error("signal span end")
