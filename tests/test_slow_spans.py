"""``spans="slow"``: the exported tree is the ``all`` tree filtered by the rule.

Each scenario runs twice, under ``all`` and under ``slow``, with sigtrace's
clock replaced by one that only the receivers move (by the duration the
scenario gives them), so that which call is "slow" is decided by the
scenario, not by the machine's load. The expected ``slow`` tree is computed
from the ``all`` tree: a receiver span is kept when its call took at least the
threshold, raised, or has a child; a signal span when the send took at least
the threshold or keeps a receiver span; every other span is kept.
"""

from __future__ import annotations

import asyncio
import threading
import time
import typing as t
from collections.abc import Callable, Iterator

import blinker
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

import sigtrace
from sigtrace import dispatch

# Binary fractions, so that the fake clock's sums and differences are exact.
THRESHOLD = 2**-6
FAST, SLOW = 2**-14, 2**-4
NS = blinker.Namespace()


class Clock:
    """sigtrace's perf_counter for a test: moved only by the receivers."""

    def __init__(self) -> None:
        self.now = 1024.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(dispatch, "perf_counter", fake)
    return fake


class Run(t.NamedTuple):
    spans: list[ReadableSpan]
    work: dict[str, tuple[int, int]]  # receiver -> wall-clock ns its work began and ended
    registry: CollectorRegistry


Scenario = Callable[[trace.Tracer, dict[str, tuple[int, int]]], None]


def run(mode: str, scenario: Scenario) -> Run:
    """``scenario(tracer, work)`` under a request-like parent span, instrumented with ``mode``."""
    while dispatch.is_instrumented():
        dispatch.uninstrument()
    exporter, provider, registry = InMemorySpanExporter(), TracerProvider(), CollectorRegistry()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sigtrace.instrument(
        registry=registry, tracer_provider=provider, spans=mode, slow_threshold=THRESHOLD
    )
    work: dict[str, tuple[int, int]] = {}
    try:
        tracer = provider.get_tracer("app")
        with tracer.start_as_current_span("GET /signup", kind=trace.SpanKind.SERVER):
            scenario(tracer, work)
    finally:
        sigtrace.uninstrument()
    spans = list(exporter.get_finished_spans())
    provider.shutdown()
    return Run(spans, work, registry)


def shape(
    spans: list[ReadableSpan], keep: Callable[[ReadableSpan], bool] = lambda s: True
) -> t.Any:
    """The tree as nested tuples: name, kind, attributes, status, events, children."""
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        by_parent.setdefault(span.parent.span_id if span.parent else None, []).append(span)

    def node(span: ReadableSpan) -> t.Any:
        children = by_parent.get(span.context.span_id, [])
        return (
            span.name,
            span.kind,
            tuple(sorted((span.attributes or {}).items())),
            span.status.status_code,
            span.status.description,
            tuple(event.name for event in span.events),
            tuple(sorted((node(c) for c in children if keep(c)), key=repr)),
        )

    ids = {s.context.span_id for s in spans}
    roots = [s for s in spans if s.parent is None or s.parent.span_id not in ids]
    return tuple(sorted((node(r) for r in roots if keep(r)), key=repr))


def filtered(all_spans: list[ReadableSpan], durations: dict[str, float]) -> t.Any:
    """The ``all`` tree filtered by the ``slow`` rule; ``durations`` by receiver span name."""
    children: dict[int, list[ReadableSpan]] = {}
    for span in all_spans:
        if span.parent is not None:
            children.setdefault(span.parent.span_id, []).append(span)

    def took(span: ReadableSpan) -> float:
        if span.name.startswith("receiver "):
            return durations.get(span.name, 0.0)
        return sum(took(c) for c in children.get(span.context.span_id, []))

    def kept(span: ReadableSpan) -> bool:
        under = children.get(span.context.span_id, [])
        if span.name.startswith("receiver "):
            failed = span.status.status_code is trace.StatusCode.ERROR
            return took(span) >= THRESHOLD or failed or bool(under)
        if span.name.startswith("signal "):
            return took(span) >= THRESHOLD or any(kept(c) for c in under)
        return True

    return shape(all_spans, kept)


def assert_filtered(scenario: Scenario, durations: dict[str, float]) -> tuple[Run, Run]:
    everything, slow = run("all", scenario), run("slow", scenario)
    assert shape(slow.spans) == filtered(everything.spans, durations)
    traces = {s.context.trace_id for s in slow.spans}
    assert len(traces) == 1, "every exported span is in the request's trace"
    ids = {s.context.span_id for s in slow.spans}
    for span in slow.spans:  # no orphans: every parent was exported
        assert span.kind is trace.SpanKind.SERVER or (span.parent and span.parent.span_id in ids)
        for child in slow.spans:  # a parent's times bracket its children's
            if child.parent and child.parent.span_id == span.context.span_id:
                assert span.start_time <= child.start_time <= child.end_time <= span.end_time
    for name, (began, ended) in slow.work.items():  # a receiver span brackets its work
        for span in slow.spans:
            if span.name == f"receiver {__name__}.{name}":
                assert span.start_time <= began <= ended <= span.end_time
    return everything, slow


def receiver(
    name: str,
    clock: Clock,
    seconds: float,
    then: Callable[[], t.Any] | None = None,
    work: dict[str, tuple[int, int]] | None = None,
) -> Callable[..., t.Any]:
    """A receiver named ``name`` whose call takes ``seconds`` on the clock, then runs ``then``."""

    def receive(sender: object, **kwargs: object) -> t.Any:
        began = time.time_ns()
        clock.spend(seconds)
        result = then() if then is not None else None
        if work is not None:
            work[name] = (began, time.time_ns())
        return result

    receive.__qualname__ = receive.__name__ = name
    return receive


def name_of(function: str) -> str:
    return f"receiver {__name__}.{function}"


def test_only_slow_receivers_and_their_send_are_exported(clock: Clock) -> None:
    sig, quiet = NS.signal("slow-mixed"), NS.signal("slow-all-fast")
    kept: list[t.Any] = []

    def scenario(tracer: trace.Tracer, work: dict[str, tuple[int, int]]) -> None:
        kept[:] = [
            receiver("fast_one", clock, FAST, work=work),
            receiver("slow_one", clock, SLOW, work=work),
            receiver("quiet_one", clock, FAST, work=work),
        ]
        sig.connect(kept[0])
        sig.connect(kept[1])
        quiet.connect(kept[2])
        sig.send("s")
        quiet.send("s")

    everything, slow = assert_filtered(
        scenario, {name_of("fast_one"): FAST, name_of("slow_one"): SLOW, name_of("quiet_one"): FAST}
    )
    assert len(everything.spans) == 6  # request, 2 signals, 3 receivers
    assert sorted(s.name for s in slow.spans) == sorted(
        ["GET /signup", "signal slow-mixed", name_of("slow_one")]
    )


def test_a_send_at_the_threshold_is_exported_and_one_just_under_is_not(clock: Clock) -> None:
    at, under = NS.signal("slow-at"), NS.signal("slow-under")
    kept: list[t.Any] = []

    def scenario(tracer: trace.Tracer, work: dict[str, tuple[int, int]]) -> None:
        # Two receivers of THRESHOLD / 2: neither span is kept, their send's is.
        kept[:] = [receiver(f"half_{i}", clock, THRESHOLD / 2) for i in range(2)]
        kept.append(receiver("exactly", clock, THRESHOLD))
        kept.append(receiver("just_under", clock, THRESHOLD - 2**-20))
        at.connect(kept[0])
        at.connect(kept[1])
        under.connect(kept[3])
        NS.signal("slow-exact").connect(kept[2])
        at.send("s")
        under.send("s")
        NS.signal("slow-exact").send("s")

    durations = {
        name_of("half_0"): THRESHOLD / 2,
        name_of("half_1"): THRESHOLD / 2,
        name_of("exactly"): THRESHOLD,
        name_of("just_under"): THRESHOLD - 2**-20,
    }
    _, slow = assert_filtered(scenario, durations)
    assert sorted(s.name for s in slow.spans) == sorted(
        ["GET /signup", "signal slow-at", "signal slow-exact", name_of("exactly")]
    )


def test_a_raising_receiver_is_exported_with_its_error(clock: Clock) -> None:
    sig = NS.signal("slow-raising")
    kept: list[t.Any] = []

    def fail() -> None:
        raise LookupError("gone")

    def scenario(tracer: trace.Tracer, work: dict[str, tuple[int, int]]) -> None:
        kept[:] = [receiver("failing", clock, FAST, fail)]
        sig.connect(kept[0])
        with pytest.raises(LookupError):
            sig.send("s")

    _, slow = assert_filtered(scenario, {name_of("failing"): FAST})
    (span,) = [s for s in slow.spans if s.name == name_of("failing")]
    assert span.status.status_code is trace.StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "LookupError"
    assert [e.name for e in span.events] == ["exception"]
    assert span.start_time <= span.events[0].timestamp <= span.end_time


@pytest.mark.parametrize("provider", ["sigtrace's", "another"])
def test_a_child_span_under_a_fast_receiver_keeps_its_parents(clock: Clock, provider: str) -> None:
    sig = NS.signal("slow-child")
    kept: list[t.Any] = []
    other = TracerProvider()
    other_exporter = InMemorySpanExporter()
    other.add_span_processor(SimpleSpanProcessor(other_exporter))

    def scenario(tracer: trace.Tracer, work: dict[str, tuple[int, int]]) -> None:
        child_tracer = tracer if provider == "sigtrace's" else other.get_tracer("db")

        def query() -> None:
            with child_tracer.start_as_current_span("SELECT users"):
                trace.get_current_span().set_attribute("db.rows", 1)

        kept[:] = [receiver("with_child", clock, FAST, query), receiver("plain", clock, FAST)]
        sig.connect(kept[0])
        sig.connect(kept[1])
        sig.send("s")

    if provider == "sigtrace's":
        _, slow = assert_filtered(scenario, {})
        names = sorted(s.name for s in slow.spans)
        assert names == sorted(
            ["GET /signup", "signal slow-child", name_of("with_child"), "SELECT users"]
        )
        return
    slow = run("slow", scenario)
    (child,) = other_exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in slow.spans}
    assert child.parent is not None
    parent = by_id[child.parent.span_id]  # exported, on sigtrace's provider
    assert parent.name == name_of("with_child")
    assert parent.parent is not None and by_id[parent.parent.span_id].name == "signal slow-child"
    assert sorted(s.name for s in slow.spans) == sorted(
        ["GET /signup", "signal slow-child", name_of("with_child")]
    )


def test_a_nested_send_in_a_fast_receiver_keeps_the_chain_to_its_slow_receiver(
    clock: Clock,
) -> None:
    outer, inner = NS.signal("slow-outer"), NS.signal("slow-inner")
    kept: list[t.Any] = []

    def scenario(tracer: trace.Tracer, work: dict[str, tuple[int, int]]) -> None:
        kept[:] = [
            receiver("outer_fast", clock, 0.0, lambda: inner.send("s")),
            receiver("inner_slow", clock, SLOW, work=work),
            receiver("inner_fast", clock, FAST),
            receiver("outer_other", clock, FAST),
        ]
        outer.connect(kept[0])
        outer.connect(kept[3])
        inner.connect(kept[1])
        inner.connect(kept[2])
        outer.send("s")

    # The outer receiver's own duration includes the nested send's.
    durations = {name_of("outer_fast"): SLOW, name_of("inner_slow"): SLOW}
    _, slow = assert_filtered(scenario, durations)
    assert sorted(s.name for s in slow.spans) == sorted(
        [
            "GET /signup",
            "signal slow-outer",
            name_of("outer_fast"),
            "signal slow-inner",
            name_of("inner_slow"),
        ]
    )


def test_async_receivers(clock: Clock) -> None:
    sig = NS.signal("slow-async")

    async def slow_async(sender: object, **kwargs: object) -> str:
        await asyncio.sleep(0)
        clock.spend(SLOW)
        return "slow"

    async def fast_async(sender: object, **kwargs: object) -> str:
        await asyncio.sleep(0)
        return "fast"

    def scenario(tracer: trace.Tracer, work: dict[str, tuple[int, int]]) -> None:
        sig.connect(slow_async)
        sig.connect(fast_async)
        results = asyncio.run(sig.send_async("s"))
        assert sorted(r for _, r in results) == ["fast", "slow"]

    prefix = "receiver tests.test_slow_spans.test_async_receivers.<locals>."
    _, slow = assert_filtered(scenario, {prefix + "slow_async": SLOW})
    assert sorted(s.name for s in slow.spans) == sorted(
        ["GET /signup", "signal slow-async", prefix + "slow_async"]
    )


def test_exemplars_name_only_exported_spans(clock: Clock) -> None:
    sig = NS.signal("slow-exemplars")
    kept: list[t.Any] = []

    def scenario(tracer: trace.Tracer, work: dict[str, tuple[int, int]]) -> None:
        kept[:] = [receiver("ex_fast", clock, FAST), receiver("ex_slow", clock, SLOW)]
        sig.connect(kept[0])
        sig.connect(kept[1])
        sig.send("s")

    slow = run("slow", scenario)
    exported = {format(s.context.span_id, "016x"): s.name for s in slow.spans}
    text = openmetrics_latest(slow.registry).decode()
    named: dict[str, str] = {}  # receiver label (or the signal's series) -> span named
    for line in text.splitlines():
        if "slow-exemplars" in line and "# {" in line:
            span_id = line.split('span_id="')[1].split('"')[0]
            assert span_id in exported, f"exemplar names a span that was not exported: {line}"
            series = line.split('receiver="')[1].split('"')[0] if 'receiver="' in line else "send"
            named[series] = exported[span_id]
    assert named[f"{__name__}.ex_slow"] == name_of("ex_slow")  # its own span
    # Called before the slow one: when it returned, the request span was the
    # nearest ancestor known to be exported.
    assert named[f"{__name__}.ex_fast"] == "GET /signup"
    assert named["send"] == "signal slow-exemplars"


def test_a_send_racing_uninstrument_finishes_with_its_spans(clock: Clock) -> None:
    sig = NS.signal("slow-race")
    inside, release = threading.Event(), threading.Event()

    def blocking() -> None:
        inside.set()
        assert release.wait(10)

    kept = [receiver("racing", clock, SLOW, blocking)]
    sig.connect(kept[0])
    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    while dispatch.is_instrumented():
        dispatch.uninstrument()
    sigtrace.instrument(tracer_provider=provider, registry=CollectorRegistry(), spans="slow")
    errors: list[BaseException] = []

    def send() -> None:
        try:
            with provider.get_tracer("app").start_as_current_span("GET /race"):
                sig.send("s")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    assert inside.wait(10)
    sigtrace.uninstrument()
    assert blinker.Signal.send is dispatch._blinker_functions["send"]
    release.set()
    thread.join(10)
    assert not errors
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == sorted(["GET /race", "signal slow-race", name_of("racing")])


def test_threshold_and_mode_are_validated() -> None:
    with pytest.raises(ValueError, match="slow_threshold"):
        sigtrace.Options(spans="slow", slow_threshold=0)
    with pytest.raises(ValueError, match="slow_threshold"):
        sigtrace.Options(spans="slow", slow_threshold=float("inf"))
    with pytest.raises(ValueError, match="up to 3600"):
        sigtrace.Options(spans="slow", slow_threshold=3601)
    assert sigtrace.Options(spans="slow").slow_threshold == 0.001


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield
    while dispatch.is_instrumented():
        dispatch.uninstrument()
