"""Concurrent sends and requests: exact counts, and no span lands in another's trace.

Every receiver logs the tag its send carried and the span current while it ran;
each such span must be sigtrace's receiver span, under the signal span of that
very send, under the request (by ``url.path``) or job span of the same thread or
task. A context leaking between threads or tasks shows as a receiver span whose
ancestor carries another tag.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import pytest
from blinker import NamedSignal
from flask import Flask, current_app
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

import sigtrace
from sigtrace import SigTrace
from tests.conftest import run_threads, sample

THREADS = 16
PER_THREAD = 60
TASKS = 200

pytestmark = pytest.mark.usefixtures("clean_otel_context", "frequent_thread_switches")


class Spans:
    """Finished spans by id, with the walk up to a span's root."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.all = exporter.get_finished_spans()
        self.by_id = {span.context.span_id: span for span in self.all}

    def parent(self, span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None, f"{span.name} has no parent"
        assert span.parent.trace_id == span.context.trace_id, f"{span.name} crossed traces"
        found = self.by_id.get(span.parent.span_id)
        assert found is not None, f"the parent of {span.name} was never exported"
        return found

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [span for span in self.all if span.name.startswith(prefix)]


class Log:
    """What receivers saw: the tag of their send and the span current in them."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

    def add(self, receiver: str, tag: str) -> None:
        span_id = trace.get_current_span().get_span_context().span_id
        with self._lock:
            self.entries.append((receiver, tag, span_id))


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def assert_receiver_span_chain(
    spans: Spans, log: Log, signal: str, root_for_tag: Callable[[str], tuple[SpanKind, str]]
) -> None:
    """Each logged receiver ran in its receiver span < signal span < its own root."""
    for receiver, tag, span_id in log.entries:
        span = spans.by_id.get(span_id)
        assert span is not None, f"{receiver} for {tag} ran under no exported span"
        assert span.name == f"receiver {receiver}", (span.name, tag)
        signal_span = spans.parent(span)
        assert signal_span.name == f"signal {signal}", (signal_span.name, tag)
        root = spans.parent(signal_span)
        kind, expected = root_for_tag(tag)
        got = root.attributes.get("url.path") if kind is SpanKind.SERVER else root.name
        assert (root.kind, got) == (kind, expected), (
            f"the receiver span of the send tagged {tag!r} sits under {root.kind} {got!r}: "
            "a span context crossed between threads or tasks"
        )
        assert root.parent is None, f"{root.name} should be the root of its trace"


# --------------------------------------------------------------------------
# Threads: Flask requests and direct sends at once


class Ledger:
    def __init__(self, log: Log) -> None:
        self.log = log

    def on_work(self, sender: object, tag: str, **kwargs: object) -> str:
        self.log.add(f"{__name__}.Ledger.on_work", tag)
        return tag


def test_threads_sending_and_serving_keep_exact_counts_and_own_contexts(
    registry: CollectorRegistry, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    log = Log()
    work_done = NamedSignal("work-done")
    ledger = Ledger(log)

    def count_work(sender: object, tag: str, **kwargs: object) -> None:
        log.add(f"{__name__}.{count_work.__qualname__}", tag)

    work_done.connect(count_work)
    work_done.connect(ledger.on_work)
    app = Flask("concurrency")

    @app.get("/work/<tag>")
    def work(tag: str) -> str:
        work_done.send(current_app._get_current_object(), tag=tag)  # type: ignore[attr-defined]
        return tag

    ext = SigTrace(app, registry=registry, tracer_provider=provider)
    jobs = provider.get_tracer("jobs")

    def thread_work(index: int) -> None:
        client = app.test_client()
        for i in range(PER_THREAD):
            tag = f"request-t{index}-{i}"
            response = client.get(f"/work/{tag}")
            assert response.status_code == 200 and response.text == tag
            tag = f"job-t{index}-{i}"
            with jobs.start_as_current_span(tag):
                assert [v for _, v in work_done.send("job", tag=tag) if v] == [tag]
            work_done.send("untraced", tag="untraced")  # no parent: metrics only

    try:
        run_threads(THREADS, thread_work)
    finally:
        ext.close()

    total = THREADS * PER_THREAD
    assert sample(registry, "sigtrace_signal_sends_total", signal="work-done") == 3 * total
    assert sample(registry, "sigtrace_signal_duration_seconds_count", signal="work-done") == (
        3 * total
    )
    for receiver in (f"{__name__}.test_threads_sending_and_serving_keep_exact_counts_and_own_"
                     "contexts.<locals>.count_work", f"{__name__}.Ledger.on_work"):  # fmt: skip
        labels = {"signal": "work-done", "receiver": receiver}
        assert sample(registry, "sigtrace_receiver_duration_seconds_count", **labels) == 3 * total
    http = {"method": "GET", "endpoint": "work", "status": "200"}
    assert sample(registry, "sigtrace_http_request_duration_seconds_count", **http) == total
    assert sample(registry, "sigtrace_signal_sends_total", signal="request-started") == total
    assert sample(registry, "sigtrace_signal_sends_total", signal="request-finished") == total

    spans = Spans(exporter)
    assert len(log.entries) == 2 * 3 * total
    traced = [entry for entry in log.entries if entry[1] != "untraced"]
    assert len(spans.named("receiver ")) == len(traced) == 2 * 2 * total
    assert len(spans.named("signal work-done")) == 2 * total
    assert len({span.context.trace_id for span in spans.all}) == 2 * total

    log.entries = traced

    def root_for(tag: str) -> tuple[SpanKind, str]:
        if tag.startswith("request-"):
            return SpanKind.SERVER, f"/work/{tag}"
        return SpanKind.INTERNAL, tag

    assert_receiver_span_chain(spans, log, "work-done", root_for)


# --------------------------------------------------------------------------
# asyncio: many tasks interleaving at every await


def test_concurrent_tasks_keep_exact_counts_and_own_contexts(
    registry: CollectorRegistry, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    log = Log()
    order_paid = NamedSignal("order-paid")

    async def charge(sender: object, tag: str, **kwargs: object) -> str:
        for _ in range(3):
            await asyncio.sleep(0)  # let every other task run in between
            log.add(f"{__name__}.{charge.__qualname__}", tag)
        return tag

    async def receipt(sender: object, tag: str, **kwargs: object) -> str:
        await asyncio.sleep(0)
        log.add(f"{__name__}.{receipt.__qualname__}", tag)
        await asyncio.sleep(0)
        return tag

    order_paid.connect(charge)
    order_paid.connect(receipt)
    tracer = provider.get_tracer("tasks")
    sigtrace.instrument(registry=registry, tracer_provider=provider)

    async def task(index: int) -> list[str]:
        tag = f"task-{index}"
        with tracer.start_as_current_span(tag):
            await asyncio.sleep(0)
            results = await order_paid.send_async("shop", tag=tag)
            assert trace.get_current_span().name == tag  # type: ignore[attr-defined]
        return [value for _, value in results]

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(task(i) for i in range(TASKS)))

    results = asyncio.run(main())
    assert results == [[f"task-{i}", f"task-{i}"] for i in range(TASKS)]

    assert sample(registry, "sigtrace_signal_sends_total", signal="order-paid") == TASKS
    for name in (charge.__qualname__, receipt.__qualname__):
        labels = {"signal": "order-paid", "receiver": f"{__name__}.{name}"}
        assert sample(registry, "sigtrace_receiver_duration_seconds_count", **labels) == TASKS
    spans = Spans(exporter)
    assert len(log.entries) == 4 * TASKS
    assert len(spans.named("receiver ")) == 2 * TASKS
    assert_receiver_span_chain(spans, log, "order-paid", lambda tag: (SpanKind.INTERNAL, tag))


# --------------------------------------------------------------------------
# Flask async views and async receivers under concurrent requests


def test_async_views_under_concurrent_requests(
    registry: CollectorRegistry, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    log = Log()
    shipped = NamedSignal("order-shipped")
    packed = NamedSignal("order-packed")

    async def notify(sender: object, tag: str, **kwargs: object) -> str:
        await asyncio.sleep(0)
        log.add(f"{__name__}.{notify.__qualname__}", tag)
        return tag

    async def label(sender: object, tag: str, **kwargs: object) -> str:
        await asyncio.sleep(0)
        log.add(f"{__name__}.{label.__qualname__}", tag)
        return tag

    shipped.connect(notify)
    packed.connect(label)
    app = Flask("async-concurrency")

    @app.get("/ship/<tag>")
    async def ship(tag: str) -> str:
        results = await shipped.send_async(current_app._get_current_object(), tag=tag)  # type: ignore[attr-defined]
        return ",".join(value for _, value in results)

    @app.get("/pack/<tag>")
    def pack(tag: str) -> str:
        # A sync view reaching an async receiver through Flask's wrapper.
        app_obj = current_app._get_current_object()  # type: ignore[attr-defined]
        results = packed.send(app_obj, _async_wrapper=app_obj.ensure_sync, tag=tag)
        return ",".join(value for _, value in results)

    ext = SigTrace(app, registry=registry, tracer_provider=provider)

    def thread_work(index: int) -> None:
        client = app.test_client()
        for i in range(PER_THREAD // 2):
            for path in ("ship", "pack"):
                tag = f"{path}-t{index}-{i}"
                response = client.get(f"/{path}/{tag}")
                assert (response.status_code, response.text) == (200, tag)

    try:
        run_threads(THREADS, thread_work)
    finally:
        ext.close()

    total = THREADS * (PER_THREAD // 2)
    for signal, receiver, endpoint in (("order-shipped", notify, "ship"),
                                       ("order-packed", label, "pack")):  # fmt: skip
        assert sample(registry, "sigtrace_signal_sends_total", signal=signal) == total
        labels = {"signal": signal, "receiver": f"{__name__}.{receiver.__qualname__}"}
        assert sample(registry, "sigtrace_receiver_duration_seconds_count", **labels) == total
        http = {"method": "GET", "endpoint": endpoint, "status": "200"}
        assert sample(registry, "sigtrace_http_request_duration_seconds_count", **http) == total
    spans = Spans(exporter)
    assert len(log.entries) == 2 * total
    assert len(spans.named("receiver ")) == 2 * total
    for prefix, signal in (("ship", "order-shipped"), ("pack", "order-packed")):
        entries = Log()
        entries.entries = [e for e in log.entries if e[1].startswith(prefix)]
        assert_receiver_span_chain(
            spans, entries, signal, lambda tag, p=prefix: (SpanKind.SERVER, f"/{p}/{tag}")
        )
