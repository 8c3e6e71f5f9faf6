"""The request's SERVER span, made for less than half of what the SDK's tracer costs.

Every traced request makes one, whatever the span mode: under ``slow`` with
fast receivers it is the only span a request exports, so its cost is most of
what tracing costs. The SDK's ``Tracer.start_span``, ``update_name``,
``set_attributes`` and ``Span.end`` take about 22 µs for it on CPython 3.11
(mostly the span's set-up: two bounded lists, attributes validated one by
one, locks), against about 10 µs here.

What this module makes is the SDK's own span class (:class:`ServerSpan`
subclasses ``opentelemetry.sdk.trace.Span``: processors and exporters get what
they always get, and every Span method is the SDK's but the lazy event and
link lists and a step before ``end``; the SDK's attribute setters write into a
dict that notes them), with the decisions ``Tracer.start_span`` makes (its
sampler, its id generator, the trace flags, the processors' ``on_start``)
taken as the SDK takes them. The SDK's default sampler (``ParentBased(ALWAYS_ON)``
or ``ALWAYS_ON``, those classes exactly) is not asked about a span without a
parent: its answer is always the same (record and sample, the attributes as
given, no trace state). It differs in what it does not redo: sigtrace's
own attributes, strings and integers it built itself, are kept as they are
unless span limits are set (then, and for any attribute other code sets, the
SDK's ``BoundedAttributes`` cleans and bounds them when the span ends, as it
would have when they were set). Any other tracer (not the SDK's, a subclass of
it, a disabled one) gets ``tracer.start_span``, and so does a fault in this
module.

Hand-written because OpenTelemetry offers no cheaper way to start a span.
It reads fields of the SDK's ``Tracer`` and ``Span``, so ``tests/test_server_span.py``
compares what it exports with what ``Tracer.start_span`` exports, field by
field, at the lowest and the newest SDK sigtrace supports.
"""

from __future__ import annotations

import logging
import threading
import typing as t
from time import time_ns

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, StaticSampler
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from .faults import internal_error
from .tracing import SPAN_KEY as _SPAN_KEY

__all__ = ["ServerSpan", "start_span"]

_sdk_log = logging.getLogger(sdk_trace.__name__)  # the SDK's own warnings, on its logger

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
_RANDOM_TRACE_ID = getattr(TraceFlags, "RANDOM_TRACE_ID", None)  # not in 1.40: set as newer do
_UNSET = Status(StatusCode.UNSET)
_new = object.__new__
_RECORD_AND_SAMPLE = Decision.RECORD_AND_SAMPLE


class _Attributes(dict):  # type: ignore[type-arg]
    """The span's attributes until it ends: a dict that notes whether other code set any
    (they are cleaned then). ``_immutable`` is what the SDK's ``Span.end`` sets."""

    _immutable = False
    foreign = False

    def __setitem__(self, key: str, value: t.Any) -> None:
        self.foreign = True
        super().__setitem__(key, value)

    def _set_items(self, items: t.Mapping[str, t.Any]) -> None:  # the SDK's set_attributes
        for key, value in items.items():
            self[key] = value


class ServerSpan(sdk_trace.Span):
    """An SDK span set up without the SDK's per-span validation (see the module)."""

    # What the SDK's methods read and a server span starts with (the instance's own
    # once changed), or never changes.
    _kind = SpanKind.SERVER
    _status = _UNSET
    _end_time: int | None = None
    _trace_config = None
    _record_exception = True
    _set_status_on_exception = True
    # Events and links: none until one is added (then the SDK's bounded list), so
    # that a span without them allocates neither list.
    _events: t.Any = ()
    _links: t.Any = ()

    def _setup(
        self,
        tracer: sdk_trace.Tracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: _Attributes,
        start_time: int,
        record_end_metrics: t.Callable[[], None] | None,
    ) -> None:
        """What ``Span.__init__`` sets (made with ``object.__new__``: see :func:`_start`)."""
        # ReadableSpan's fields
        self._name = name
        self._context = context
        self._instrumentation_info = tracer.instrumentation_info
        self._instrumentation_scope = tracer._instrumentation_scope
        self._parent = parent
        self._start_time = start_time
        self._attributes = attributes
        self._resource = tracer.resource
        # Span's fields
        limits = tracer._span_limits
        self._sampler = tracer.sampler
        self._span_processor = tracer.span_processor
        self._limits = limits
        self._lock = threading.Lock()
        self._record_end_metrics = record_end_metrics

    def _add_event(self, event: t.Any) -> None:
        with self._lock:
            if self._end_time is None:
                if type(self._events) is tuple:
                    self._events = self._new_events()  # type: ignore[no-untyped-call]
                self._events.append(event)
                return
        _sdk_log.warning("Tried calling %s on an ended span.", "_add_event")

    def _add_link(self, link: t.Any) -> None:
        with self._lock:
            if self._end_time is None:
                if type(self._links) is tuple:
                    self._links = self._new_links(())
                self._links.append(link)
                return
        _sdk_log.warning("Tried calling %s on an ended span.", "_add_link")

    def set_own_attributes(
        self, attributes: t.Mapping[str, t.Any], name: str | None = None
    ) -> None:
        """sigtrace's own attributes (valid by construction), kept as they are, and its
        new name if given (``update_name``), in one step."""
        with self._lock:
            if self._end_time is None:
                dict.update(t.cast(dict[str, t.Any], self._attributes), attributes)
                if name is not None:
                    self._name = name

    def end(self, end_time: int | None = None) -> None:
        with self._lock:
            attributes = self._attributes
            limits = self._limits
            if type(attributes) is _Attributes and (
                attributes.foreign
                or limits.max_span_attribute_length is not None
                or (
                    limits.max_span_attributes is not None
                    and len(attributes) > limits.max_span_attributes
                )
            ):  # what the SDK would have done as each was set
                self._attributes = BoundedAttributes(
                    limits.max_span_attributes,
                    attributes,
                    immutable=False,
                    max_value_len=limits.max_span_attribute_length,
                )
        super().end(end_time)


def _sdk_tracer(tracer: trace.Tracer) -> sdk_trace.Tracer | None:
    """The SDK tracer behind ``tracer`` (a proxy's, once set), if it starts spans the
    SDK's plain way (not a subclass, and enabled); else None."""
    if type(tracer) is trace.ProxyTracer:
        tracer = getattr(tracer, "_tracer", tracer)  # the provider's, once one is set
    if type(tracer) is not sdk_trace.Tracer:
        return None
    is_enabled = getattr(tracer, "_is_enabled", None)
    if is_enabled is not None and not is_enabled():
        return None
    return tracer


def start_span(
    tracer: trace.Tracer, name: str, parent: Context, attributes: dict[str, t.Any]
) -> trace.Span:
    """``tracer.start_span(name, parent, SpanKind.SERVER, attributes)``, cheaper when
    ``tracer`` is the SDK's (the module says how)."""
    sdk = _sdk_tracer(tracer)
    if sdk is not None:
        try:
            return _start(sdk, name, parent, attributes)
        except Exception:
            internal_error("server span start")
    return tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)


def _samples_roots(sampler: t.Any) -> bool:
    """Whether ``sampler`` is the SDK's default (``ParentBased(ALWAYS_ON)``) or ``ALWAYS_ON``
    itself, exactly: a sampler that records and samples every root span, adding nothing.
    Checked at each request (a few reads), so that a sampler changed since is obeyed."""
    if type(sampler) is ParentBased:
        sampler = sampler._root
    return type(sampler) is StaticSampler and sampler._decision is _RECORD_AND_SAMPLE


def _start(
    tracer: sdk_trace.Tracer, name: str, parent: Context, attributes: dict[str, t.Any]
) -> trace.Span:
    # Tracer.start_span's decisions, in its order.
    parent_span: t.Any = parent.get(_SPAN_KEY)  # trace.get_current_span(parent), inlined
    parent_context: SpanContext | None = (
        None if parent_span is None else parent_span.get_span_context()
    )
    if parent_context is None or not parent_context.is_valid:
        parent_context = None
        trace_id = tracer.id_generator.generate_trace_id()
    else:
        trace_id = parent_context.trace_id
    sampler = tracer.sampler
    given: t.Mapping[str, t.Any] | None  # what the SDK's span starts with: the sampler's
    if parent_context is None and _samples_roots(sampler):
        # What the sampler would answer: RECORD_AND_SAMPLE, the attributes it was
        # given, no trace state (a root has no parent's to carry).
        decision, given, trace_state = _RECORD_AND_SAMPLE, attributes, None
        sampled = recording = True
    else:
        result = sampler.should_sample(parent, trace_id, name, SpanKind.SERVER, attributes, ())
        decision, given, trace_state = result.decision, result.attributes, result.trace_state
        sampled, recording = decision.is_sampled(), decision.is_recording()  # type: ignore[no-untyped-call]
    flags = _SAMPLED if sampled else _UNSAMPLED
    if _RANDOM_TRACE_ID is not None:
        # typed as Any: OpenTelemetry 1.40, the lowest supported, has neither
        ids: t.Any = tracer.id_generator
        parent_flags: t.Any = None if parent_context is None else parent_context.trace_flags
        random = ids.is_trace_id_random() if parent_flags is None else parent_flags.random_trace_id
        if random:
            flags = TraceFlags(flags | _RANDOM_TRACE_ID)
    context = SpanContext(
        trace_id,
        tracer.id_generator.generate_span_id(),
        is_remote=False,
        trace_flags=flags,
        trace_state=trace_state,
    )
    record_end_metrics = tracer._tracer_metrics.start_span(parent_context, decision)
    if not recording:
        return trace.NonRecordingSpan(context)
    span: ServerSpan = _new(ServerSpan)  # not through the SDK's Span.__new__ (Python-level)
    span._setup(
        tracer,
        name,
        context,
        parent_context,
        _Attributes() if given is None else _Attributes(given),
        time_ns(),
        record_end_metrics,
    )
    tracer.span_processor.on_start(span, parent_context=parent)
    return span
