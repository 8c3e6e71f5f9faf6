"""The request's server span, started by sigtrace.server_span, is exported exactly as
``Tracer.start_span`` would export it: compared field by field, the ids drawn from the
same sequence, in every case the module handles itself and in those it hands back."""

from __future__ import annotations

import json
import logging
import typing as t
from collections.abc import Callable, Sequence

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sigtrace import server_span
from sigtrace.server_span import ServerSpan

ATTRIBUTES = {
    "http.request.method": "GET",
    "url.path": "/signup/alice",
    "url.scheme": "http",
    "server.address": "shop.example",
    "server.port": 8080,
    "client.address": "127.0.0.1",
    "user_agent.original": "curl/8.5.0",
}


class CountingIds(IdGenerator):
    """Ids from a counter: two providers given two of these draw the same ids."""

    def __init__(self) -> None:
        self.n = 0

    def generate_span_id(self) -> int:
        self.n += 1
        return 0x1000 + self.n

    def generate_trace_id(self) -> int:
        self.n += 1
        return 0xABC0000 + self.n


class AddingSampler(Sampler):
    """Samples, adds an attribute and a trace state, as a custom sampler may."""

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: t.Any = None,
        links: t.Any = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        return SamplingResult(
            Decision.RECORD_AND_SAMPLE,
            {**(attributes or {}), "sampler.said": name},
            TraceState([("vendor", "yes")]),
        )

    def get_description(self) -> str:
        return "AddingSampler"


class BaggageLike(SpanProcessor):
    """Sets an attribute in on_start, as opentelemetry's BaggageSpanProcessor does."""

    def on_start(self, span: t.Any, parent_context: Context | None = None) -> None:
        span.set_attribute("from.on_start", True)


def provider(**kwargs: t.Any) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    made = TracerProvider(id_generator=CountingIds(), **kwargs)
    made.add_span_processor(SimpleSpanProcessor(exporter))
    return made, exporter


def exported(span: ReadableSpan) -> dict[str, t.Any]:
    """Every field an exporter reads (times separately: they are taken, not given)."""
    as_json = json.loads(span.to_json())
    as_json.pop("start_time"), as_json.pop("end_time")
    for event in as_json["events"]:
        if event["name"] == "exception":  # the stack differs by the caller's line only
            event["attributes"].pop("exception.stacktrace")
    return {
        "json": as_json,
        "type": type(span),
        "attributes": dict(span.attributes or {}),
        "context": span.context,
        "parent": span.parent,
        "dropped": (span.dropped_attributes, span.dropped_events, span.dropped_links),
        "scope": span.instrumentation_scope,
        "resource": span.resource.attributes,
        "status": (span.status.status_code, span.status.description),
    }


def both(
    use: Callable[[trace.Span], None] = lambda span: None,
    parent: Context | None = None,
    attributes: dict[str, t.Any] | None = None,
    processors: Sequence[SpanProcessor] = (),
    **kwargs: t.Any,
) -> tuple[list[ReadableSpan], list[ReadableSpan], trace.Span, trace.Span]:
    """The same span made by the SDK and by sigtrace, ``use``d and ended."""
    made = []
    for start in ("sdk", "sigtrace"):
        prov, exporter = provider(**kwargs)
        for processor in processors:
            prov.add_span_processor(processor)
        tracer = prov.get_tracer("sigtrace", "1.0")
        given = dict(ATTRIBUTES if attributes is None else attributes)
        context = Context() if parent is None else parent
        if start == "sdk":
            span = tracer.start_span("GET", context=context, kind=SpanKind.SERVER, attributes=given)
        else:
            span = server_span.start_span(tracer, "GET", context, given)
        use(span)
        span.end()
        made.append((exporter.get_finished_spans(), span))
    (sdk_spans, sdk_span), (our_spans, our_span) = made
    return list(sdk_spans), list(our_spans), sdk_span, our_span


def assert_same(
    use: Callable[[trace.Span], None] = lambda span: None, **kwargs: t.Any
) -> ReadableSpan | None:
    sdk_spans, our_spans, sdk_span, our_span = both(use, **kwargs)
    assert [exported(s) for s in our_spans] == [exported(s) for s in sdk_spans]
    recording = not isinstance(sdk_span, NonRecordingSpan)
    assert type(our_span) is (ServerSpan if recording else NonRecordingSpan)
    assert isinstance(our_span, sdk_trace.Span) is recording  # what processors are given
    assert our_span.get_span_context() == sdk_span.get_span_context()
    for span in our_spans:
        assert span.start_time is not None and span.end_time is not None
        assert span.start_time <= span.end_time
    return our_spans[0] if our_spans else None


def remote(sampled: bool) -> Context:
    flags = "01" if sampled else "00"
    header = {"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-{flags}", "tracestate": "k=v"}
    return TraceContextTextMapPropagator().extract(header)


def test_a_root_span_is_the_sdks() -> None:
    span = assert_same()
    assert span is not None and span.kind is SpanKind.SERVER and span.parent is None
    assert dict(span.attributes or {}) == ATTRIBUTES


@pytest.mark.parametrize("sampled", [True, False])
def test_under_a_remote_parent(sampled: bool) -> None:
    span = assert_same(parent=remote(sampled))
    assert (span is not None) is sampled


def test_under_a_local_parent_of_another_provider() -> None:
    outer, _ = provider()
    with outer.get_tracer("app").start_as_current_span("outer") as parent:
        span = assert_same(parent=trace.set_span_in_context(parent))
    assert span is not None and span.parent == parent.get_span_context()


@pytest.mark.parametrize(
    "sampler",
    [ALWAYS_OFF, TraceIdRatioBased(0.5), ParentBased(TraceIdRatioBased(0.0)), AddingSampler()],
    ids=["off", "ratio", "parent-ratio-0", "custom"],
)
def test_each_sampler_decides_as_for_the_sdk(sampler: Sampler) -> None:
    for _ in range(8):  # the ratio sampler's decision depends on the (counted) trace id
        assert_same(sampler=sampler)


class MarkingParentBased(ParentBased):
    """The SDK's default sampler, subclassed to mark what it samples."""

    def should_sample(self, *args: t.Any, **kwargs: t.Any) -> SamplingResult:
        result = super().should_sample(*args, **kwargs)
        attributes = {**(result.attributes or {}), "marked": True}
        return SamplingResult(result.decision, attributes, result.trace_state)


@pytest.mark.parametrize(
    "sampler",
    [
        None,
        ALWAYS_ON,
        ParentBased(ALWAYS_ON),
        ParentBased(ALWAYS_OFF),
        MarkingParentBased(ALWAYS_ON),
    ],
    ids=["default", "always-on", "parent-on", "parent-off", "parent-on-subclass"],
)
@pytest.mark.parametrize("parent", ["root", "sampled", "unsampled"])
def test_samplers_that_look_like_the_default_decide_as_for_the_sdk(
    sampler: Sampler | None, parent: str
) -> None:
    context = None if parent == "root" else remote(parent == "sampled")
    kwargs: dict[str, t.Any] = {} if sampler is None else {"sampler": sampler}
    span = assert_same(parent=context, **kwargs)
    if isinstance(sampler, MarkingParentBased) and span is not None:
        assert span.attributes is not None and span.attributes["marked"] is True


def test_the_default_sampler_answers_a_root_without_being_called(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the default sampler answers for a root span is known: it is not asked (the
    answer, as exported, is compared with the SDK's above). For a span with a parent,
    or any other sampler, it is."""
    calls: list[str] = []
    for kind in (ParentBased, StaticSampler, TraceIdRatioBased):
        asked = kind.should_sample

        def counted(self: Sampler, *args: t.Any, _asked: t.Any = asked, **kw: t.Any) -> t.Any:
            calls.append(type(self).__name__)
            return _asked(self, *args, **kw)

        monkeypatch.setattr(kind, "should_sample", counted)
    for sampler, parent, expected, exports in [
        (None, None, [], 1),
        (ALWAYS_ON, None, [], 1),
        (None, remote(True), ["ParentBased", "StaticSampler"], 1),
        (ParentBased(TraceIdRatioBased(1.0)), None, ["ParentBased", "TraceIdRatioBased"], 1),
        (ParentBased(ALWAYS_OFF), None, ["ParentBased", "StaticSampler"], 0),
    ]:
        calls.clear()
        prov, exporter = provider(**({} if sampler is None else {"sampler": sampler}))
        span = server_span.start_span(
            prov.get_tracer("sigtrace"), "GET", parent or Context(), dict(ATTRIBUTES)
        )
        span.end()
        assert calls == expected, (sampler, parent)
        assert len(exporter.get_finished_spans()) == exports


def test_span_limits_apply() -> None:
    limits = SpanLimits(max_span_attributes=3, max_attribute_length=4, max_events=1, max_links=0)
    link = Link(SpanContext(1, 2, False, TraceFlags(1)))

    def use(span: trace.Span) -> None:
        span.add_event("one", {"a": "long value"}, timestamp=1)
        span.add_event("two", timestamp=2)
        span.add_link(link.context)
        span.set_attribute("late", "also long")

    span = assert_same(use, span_limits=limits)
    assert span is not None and span.dropped_attributes > 0 and span.dropped_events == 1


def test_what_other_code_does_to_it_is_exported_as_by_the_sdk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def use(span: trace.Span) -> None:
        span.set_attribute("list", [1, 2, 3])
        span.set_attribute("odd", {"a": "dict"})  # a map: dropped before OpenTelemetry 1.41
        span.set_attribute("mixed", [1, "mixed"])  # dropped, or kept, as the SDK does
        span.set_attributes({"more": 1.5, "flag": True})
        span.update_name("GET /signup/<name>")
        span.add_event("checkpoint", {"n": 1}, timestamp=123)
        span.add_link(SpanContext(5, 6, False, TraceFlags(1)), {"why": "batch"})
        try:
            raise ValueError("no")
        except ValueError as exc:
            span.record_exception(exc, timestamp=456)
        span.set_status(Status(StatusCode.ERROR, "it failed"))
        span.set_status(StatusCode.UNSET)  # ignored, as by the SDK

    with caplog.at_level(logging.WARNING):
        span = assert_same(use)
    assert span is not None and span.attributes is not None
    assert span.attributes["list"] == (1, 2, 3)  # cleaned as the SDK cleans
    assert [e.name for e in span.events] == ["checkpoint", "exception"]


def test_after_its_end_it_changes_no_more() -> None:
    ended: list[trace.Span] = []
    sdk_spans, our_spans, sdk_span, our_span = both(ended.append)
    for span in (sdk_span, our_span):
        span.set_attribute("late", 1)
        span.set_attributes({"later": 2})
        span.add_event("late", timestamp=3)
        span.update_name("renamed")
        span.end()  # a second end: a warning, nothing exported
        assert not span.is_recording()
    assert [exported(s) for s in our_spans] == [exported(s) for s in sdk_spans]
    assert len(our_spans) == 1 and our_spans[0].name == "GET"


def test_processors_see_it_start_and_may_change_it() -> None:
    span = assert_same(processors=[BaggageLike()])
    assert span is not None and span.attributes is not None
    assert span.attributes["from.on_start"] is True


def test_own_attributes_are_added_unchecked_and_exported() -> None:
    def use(span: trace.Span) -> None:
        if isinstance(span, ServerSpan):
            span.set_own_attributes({"http.route": "/signup/<name>"})
        else:
            span.set_attributes({"http.route": "/signup/<name>"})

    span = assert_same(use)
    assert span is not None and span.attributes is not None
    assert span.attributes["http.route"] == "/signup/<name>"


def test_a_tracer_it_does_not_know_gets_start_span() -> None:
    class Subclassed(sdk_trace.Tracer):
        pass

    prov, exporter = provider()
    real = prov.get_tracer("sigtrace")
    tracer = Subclassed.__new__(Subclassed)
    tracer.__dict__.update(real.__dict__)
    span = server_span.start_span(tracer, "GET", Context(), dict(ATTRIBUTES))
    assert type(span) is not ServerSpan and span.is_recording()
    span.end()
    assert [s.name for s in exporter.get_finished_spans()] == ["GET"]


def test_a_proxy_tracer_is_followed_to_the_sdks(monkeypatch: pytest.MonkeyPatch) -> None:
    prov, exporter = provider()
    proxy = trace.ProxyTracer("sigtrace")
    assert not server_span.start_span(proxy, "GET", Context(), {}).is_recording()  # no provider
    monkeypatch.setattr(proxy, "_real_tracer", prov.get_tracer("sigtrace"))
    span = server_span.start_span(proxy, "GET", Context(), dict(ATTRIBUTES))
    assert type(span) is ServerSpan
    span.end()
    assert len(exporter.get_finished_spans()) == 1


def test_a_fault_inside_falls_back_to_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    prov, exporter = provider()

    def broken(*args: t.Any, **kwargs: t.Any) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(server_span, "ServerSpan", broken)
    span = server_span.start_span(prov.get_tracer("sigtrace"), "GET", Context(), {"a": 1})
    span.end()
    assert [dict(s.attributes or {}) for s in exporter.get_finished_spans()] == [{"a": 1}]
