"""Spans of the traced send: tree, attributes, errors, async timing, sampling, modes."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import typing as t
from collections.abc import Callable, Coroutine, Iterator

import blinker
import pytest
from flask import Flask
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

import sigtrace
from sigtrace import tracing as tracing_module
from tests.conftest import sample

NS = blinker.Namespace()
SECRET = "s3cr3t-value-that-must-not-leak"


class PaymentDeclined(Exception):
    """A receiver's own exception class (its qualified name becomes error.type)."""


def on_signup(sender: object, **kwargs: object) -> str:
    return "welcomed"


def count_signup(sender: object, **kwargs: object) -> int:
    return 1


def charge_card(sender: object, **kwargs: object) -> None:
    raise PaymentDeclined("card declined")


ON_SIGNUP = f"{__name__}.on_signup"
COUNT_SIGNUP = f"{__name__}.count_signup"
CHARGE_CARD = f"{__name__}.charge_card"


class Tracing(t.NamedTuple):
    provider: TracerProvider
    exporter: InMemorySpanExporter

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, f"expected one span {name!r}, got {[s.name for s in self.spans()]}"
        return found[0]

    def parent(self, name: str = "parent") -> t.ContextManager[trace.Span]:
        return self.provider.get_tracer("tests").start_as_current_span(name)


def _tracing(provider: TracerProvider) -> Iterator[Tracing]:
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Tracing(provider, exporter)
    provider.shutdown()


@pytest.fixture
def tracing(registry: CollectorRegistry) -> Iterator[Tracing]:
    """An SDK provider recording into memory; instrument with it per test."""
    yield from _tracing(TracerProvider())


def instrument(registry: CollectorRegistry, tracing: Tracing, **options: t.Any) -> None:
    sigtrace.instrument(registry=registry, tracer_provider=tracing.provider, **options)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan | trace.Span) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


def sends(registry: CollectorRegistry, signal: str) -> float | None:
    return sample(registry, "sigtrace_signal_sends_total", signal=signal)


def receiver_calls(registry: CollectorRegistry, signal: str, receiver: str) -> float | None:
    return sample(
        registry, "sigtrace_receiver_duration_seconds_count", signal=signal, receiver=receiver
    )


# --------------------------------------------------------------------------
# The span tree


def test_send_under_a_recording_parent_makes_a_signal_span(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-signal-span")
    sig.connect(on_signup)
    sig.connect(count_signup)
    with tracing.parent() as parent:
        sig.send("sender")
    span = tracing.named("signal tr-signal-span")
    assert span.kind is SpanKind.INTERNAL
    assert parent_id(span) == span_id(parent)
    assert span.context.trace_id == parent.get_span_context().trace_id
    assert dict(span.attributes or {}) == {
        "blinker.signal.name": "tr-signal-span",
        "blinker.receivers.called": 2,
    }
    assert span.status.status_code is StatusCode.UNSET


def test_each_receiver_call_is_a_child_span_of_the_signal_span(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-receiver-spans")
    sig.connect(on_signup)
    sig.connect(count_signup)
    with tracing.parent():
        sig.send("sender")
    signal_span = tracing.named("signal tr-receiver-spans")
    for receiver in (ON_SIGNUP, COUNT_SIGNUP):
        span = tracing.named(f"receiver {receiver}")
        assert span.kind is SpanKind.INTERNAL
        assert parent_id(span) == span_id(signal_span)
        assert dict(span.attributes or {}) == {
            "blinker.signal.name": "tr-receiver-spans",
            "code.function.name": receiver,
        }
    # code.function.name is the receiver label of the metrics
    assert receiver_calls(registry, "tr-receiver-spans", ON_SIGNUP) == 1.0


def test_a_send_reaching_no_receiver_makes_no_span(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-no-receiver")
    sig.connect(on_signup, sender="someone-else")
    with tracing.parent():
        sig.send("sender")
        NS.signal("tr-never-connected").send("sender")
    assert [s.name for s in tracing.spans()] == ["parent"]
    assert sends(registry, "tr-no-receiver") == 1.0


def test_the_receiver_span_is_current_while_the_receiver_runs(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-current")
    inner = NS.signal("tr-current-inner")
    tracer = tracing.provider.get_tracer("tests")

    def makes_a_span(sender: object) -> None:
        with tracer.start_as_current_span("work inside receiver"):
            pass
        inner.send(sender)

    inner.connect(on_signup)
    sig.connect(makes_a_span)
    with tracing.parent() as parent:
        sig.send("sender")
        assert trace.get_current_span() is parent, "context restored after the send"
    receiver = tracing.named(f"receiver {__name__}.{makes_a_span.__qualname__}")
    assert parent_id(tracing.named("work inside receiver")) == span_id(receiver)
    nested_signal = tracing.named("signal tr-current-inner")
    assert parent_id(nested_signal) == span_id(receiver)
    assert parent_id(tracing.named(f"receiver {ON_SIGNUP}")) == span_id(nested_signal)


def test_a_flask_app_sender_names_the_app_on_the_signal_span(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-flask-sender")
    sig.connect(on_signup)
    with tracing.parent():
        sig.send(Flask("shop"))
    assert (tracing.named("signal tr-flask-sender").attributes or {})["flask.app.name"] == "shop"


# --------------------------------------------------------------------------
# Errors


def test_a_raising_receiver_marks_its_span_and_propagates_the_same_exception(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-error")
    raised: list[BaseException] = []

    def charge(sender: object) -> None:
        exc = PaymentDeclined("card declined")
        raised.append(exc)
        raise exc

    sig.connect(charge)
    with tracing.parent(), pytest.raises(PaymentDeclined) as caught:
        sig.send("sender")
    assert caught.value is raised[0]
    span = tracing.named(f"receiver {__name__}.{charge.__qualname__}")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == f"{__name__}.PaymentDeclined"
    events = [e for e in span.events if e.name == "exception"]
    assert len(events) == 1
    assert str((events[0].attributes or {})["exception.type"]).endswith("PaymentDeclined")
    assert (
        sample(
            registry,
            "sigtrace_receiver_errors_total",
            signal="tr-error",
            receiver=f"{__name__}.{charge.__qualname__}",
            exception="PaymentDeclined",
        )
        == 1.0
    )


def test_the_signal_span_records_the_error_that_ended_the_send(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-error-signal")
    sig.connect(charge_card)
    sig.connect(on_signup)  # runs only if blinker happens to call it first
    with tracing.parent(), pytest.raises(PaymentDeclined):
        sig.send("sender")
    span = tracing.named("signal tr-error-signal")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == f"{__name__}.PaymentDeclined"
    receivers = [s for s in tracing.spans() if s.name.startswith("receiver ")]
    assert (span.attributes or {})["blinker.receivers.called"] == len(receivers)
    assert receivers[-1].name == f"receiver {CHARGE_CARD}", "no receiver ran after the error"


def test_a_builtin_exception_has_its_bare_class_name_as_error_type(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-error-builtin")

    def broken(sender: object) -> None:
        raise KeyError("missing")

    sig.connect(broken)
    with tracing.parent(), pytest.raises(KeyError):
        sig.send("sender")
    span = tracing.named(f"receiver {__name__}.{broken.__qualname__}")
    assert (span.attributes or {})["error.type"] == "KeyError"


# --------------------------------------------------------------------------
# Async receivers: the span times the awaited work and carries the context

SLEEP = 0.05
MIN_SPAN_NS = 45_000_000  # 45 ms: the sleep, allowing for clock granularity


def duration_ns(span: ReadableSpan) -> int:
    assert span.start_time is not None and span.end_time is not None
    return span.end_time - span.start_time


def run_in_new_loop(
    func: Callable[..., Coroutine[t.Any, t.Any, t.Any]],
) -> Callable[..., t.Any]:
    """An ``_async_wrapper`` like Flask's ``ensure_sync``: run the coroutine to completion."""

    def call(*args: t.Any, **kwargs: t.Any) -> t.Any:
        return asyncio.run(func(*args, **kwargs))

    return call


def _async_receiver(tracing: Tracing) -> Callable[..., Coroutine[t.Any, t.Any, str]]:
    tracer = tracing.provider.get_tracer("tests")

    async def slow_async_receiver(sender: object, **kwargs: object) -> str:
        await asyncio.sleep(SLEEP)
        with tracer.start_as_current_span("inside coroutine"):
            await asyncio.sleep(0)
        return "done"

    return slow_async_receiver


def _assert_async_receiver_span(tracing: Tracing, signal: str) -> None:
    span = tracing.named(f"receiver {__name__}._async_receiver.<locals>.slow_async_receiver")
    assert duration_ns(span) >= MIN_SPAN_NS
    assert parent_id(span) == span_id(tracing.named(f"signal {signal}"))
    assert parent_id(tracing.named("inside coroutine")) == span_id(span)
    assert duration_ns(tracing.named(f"signal {signal}")) >= MIN_SPAN_NS


def test_send_async_receiver_span_covers_the_awaited_work(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-send-async")
    receiver = _async_receiver(tracing)
    sig.connect(receiver)

    async def main() -> list[tuple[t.Any, t.Any]]:
        with tracing.parent():
            return await sig.send_async("sender")

    assert asyncio.run(main()) == [(receiver, "done")]
    _assert_async_receiver_span(tracing, "tr-send-async")


def test_async_wrapper_receiver_span_covers_the_awaited_work(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-async-wrapper")
    receiver = _async_receiver(tracing)
    sig.connect(receiver)
    with tracing.parent():
        assert sig.send("sender", _async_wrapper=run_in_new_loop) == [(receiver, "done")]
    _assert_async_receiver_span(tracing, "tr-async-wrapper")


def test_flask_ensure_sync_receiver_span_covers_the_awaited_work(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    # what Flask passes to its own signals; needs asgiref (flask[async])
    instrument(registry, tracing)
    sig = NS.signal("tr-ensure-sync")
    receiver = _async_receiver(tracing)
    sig.connect(receiver)
    with tracing.parent():
        assert sig.send("sender", _async_wrapper=Flask("shop").ensure_sync) == [(receiver, "done")]
    _assert_async_receiver_span(tracing, "tr-ensure-sync")


def test_sync_wrapper_receiver_in_send_async_gets_a_span_covering_it(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-sync-wrapper")

    def slow_sync(sender: object) -> str:
        time.sleep(SLEEP)
        return "done"

    def to_async(func: Callable[..., t.Any]) -> Callable[..., t.Any]:
        async def call(*args: t.Any, **kwargs: t.Any) -> t.Any:
            return func(*args, **kwargs)

        return call

    sig.connect(slow_sync)

    async def main() -> None:
        with tracing.parent():
            await sig.send_async("sender", _sync_wrapper=to_async)

    asyncio.run(main())
    span = tracing.named(f"receiver {__name__}.{slow_sync.__qualname__}")
    assert duration_ns(span) >= MIN_SPAN_NS


def test_an_async_receiver_error_is_recorded_on_its_span(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-async-error")

    async def fails_later(sender: object) -> None:
        await asyncio.sleep(0.001)
        raise PaymentDeclined("declined after awaiting")

    sig.connect(fails_later)

    async def main() -> None:
        with tracing.parent():
            await sig.send_async("sender")

    with pytest.raises(PaymentDeclined):
        asyncio.run(main())
    span = tracing.named(f"receiver {__name__}.{fails_later.__qualname__}")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == f"{__name__}.PaymentDeclined"


# --------------------------------------------------------------------------
# Only under a recording parent (or as roots when asked); metrics regardless


def test_without_a_parent_span_no_span_is_made_but_metrics_count(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-no-parent")
    sig.connect(on_signup)
    sig.send("sender")
    assert tracing.spans() == []
    assert sends(registry, "tr-no-parent") == 1.0
    assert receiver_calls(registry, "tr-no-parent", ON_SIGNUP) == 1.0


def test_under_an_unsampled_parent_no_span_is_exported_but_metrics_count(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-unsampled")
    sig.connect(on_signup)
    unsampled = NonRecordingSpan(
        SpanContext(
            trace_id=0x0AF7651916CD43DD8448EB211C80319C,
            span_id=0xB7AD6B7169203331,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.DEFAULT),
        )
    )
    token = otel_context.attach(trace.set_span_in_context(unsampled))
    try:
        sig.send("sender")
        sig.send("sender")
    finally:
        otel_context.detach(token)
    assert tracing.spans() == []
    assert sends(registry, "tr-unsampled") == 2.0
    assert receiver_calls(registry, "tr-unsampled", ON_SIGNUP) == 2.0


def test_with_an_always_off_sampler_no_span_is_exported_but_metrics_count(
    registry: CollectorRegistry,
) -> None:
    for tracing in _tracing(TracerProvider(sampler=ALWAYS_OFF)):
        instrument(registry, tracing, root_spans=True)
        sig = NS.signal("tr-always-off")
        sig.connect(on_signup)
        with tracing.parent():
            sig.send("sender")
        sig.send("sender")  # a root span would be made, and dropped by the sampler
        assert tracing.spans() == []
        assert sends(registry, "tr-always-off") == 2.0
        assert receiver_calls(registry, "tr-always-off", ON_SIGNUP) == 2.0


def test_root_spans_makes_a_root_signal_span_outside_any_span(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing, root_spans=True)
    sig = NS.signal("tr-root")
    sig.connect(on_signup)
    sig.send("sender")
    sig.send("sender")
    roots = [s for s in tracing.spans() if s.name == "signal tr-root"]
    assert len(roots) == 2
    assert all(s.parent is None for s in roots)
    assert roots[0].context.trace_id != roots[1].context.trace_id
    receivers = [s for s in tracing.spans() if s.name == f"receiver {ON_SIGNUP}"]
    assert sorted(parent_id(s) or 0 for s in receivers) == sorted(span_id(s) for s in roots)


# --------------------------------------------------------------------------
# Span modes


@pytest.mark.parametrize(
    ("mode", "signal_spans", "receiver_spans"),
    [("all", 1, 2), ("signals", 1, 0), ("receivers", 0, 2), ("none", 0, 0)],
)
def test_span_mode_chooses_which_spans_are_made(
    registry: CollectorRegistry,
    tracing: Tracing,
    mode: str,
    signal_spans: int,
    receiver_spans: int,
) -> None:
    instrument(registry, tracing, spans=mode)
    sig = NS.signal(f"tr-mode-{mode}")
    sig.connect(on_signup)
    sig.connect(count_signup)
    with tracing.parent() as parent:
        sig.send("sender")
    made = [s for s in tracing.spans() if s.name != "parent"]
    signals = [s for s in made if s.name.startswith("signal ")]
    receivers = [s for s in made if s.name.startswith("receiver ")]
    assert (len(signals), len(receivers)) == (signal_spans, receiver_spans)
    expected_parent = span_id(signals[0]) if signals else span_id(parent)
    assert all(parent_id(s) == expected_parent for s in receivers)
    assert sends(registry, f"tr-mode-{mode}") == 1.0  # metrics whatever the mode


# --------------------------------------------------------------------------
# Attribute privacy


def _everything_exported(spans: list[ReadableSpan]) -> str:
    parts: list[str] = []
    for span in spans:
        parts.append(span.name)
        parts.extend(f"{k}={v!s}" for k, v in (span.attributes or {}).items())
        for event in span.events:
            parts.append(event.name)
            parts.extend(f"{k}={v!s}" for k, v in (event.attributes or {}).items())
        parts.append(str(span.status.description))
    return "\n".join(parts)


class SecretSender:
    def __repr__(self) -> str:
        return f"<SecretSender {SECRET}>"

    __str__ = __repr__


def test_only_allow_listed_kwargs_become_attributes(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing, record_kwargs=("plan",))
    sig = NS.signal("tr-kwargs")
    sig.connect(on_signup)

    def fails(sender: object, **kwargs: object) -> None:
        raise PaymentDeclined("declined")

    sig.connect(fails)
    with tracing.parent(), pytest.raises(PaymentDeclined):
        sig.send(SecretSender(), plan="pro", password=SECRET, card={"number": SECRET})
    attributes = dict(tracing.named("signal tr-kwargs").attributes or {})
    assert attributes["blinker.kwargs.plan"] == "pro"
    assert not any(k in attributes for k in ("blinker.kwargs.password", "blinker.kwargs.card"))
    exported = _everything_exported(tracing.spans())
    assert "blinker.kwargs.plan=pro" in exported  # the check below can see attributes
    assert SECRET not in exported


def test_an_allow_listed_kwarg_missing_from_the_send_is_not_recorded(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing, record_kwargs=("plan",))
    sig = NS.signal("tr-kwargs-missing")
    sig.connect(on_signup)
    with tracing.parent():
        sig.send("sender", other=1)
    assert "blinker.kwargs.plan" not in (tracing.named("signal tr-kwargs-missing").attributes or {})


# --------------------------------------------------------------------------
# Exemplars link metrics to traces


def _exemplar_ids(exposition: str, receiver: str) -> list[tuple[str, str]]:
    """(trace id, span id) of the receiver's bucket exemplars, as a scrape shows them."""
    pattern = re.compile(
        r'^sigtrace_receiver_duration_seconds_bucket\{[^}]*receiver="'
        + re.escape(receiver)
        + r'"[^}]*\} \S+ # \{span_id="([0-9a-f]{16})",trace_id="([0-9a-f]{32})"\}',
        re.MULTILINE,
    )
    return [(trace_id, span_id) for span_id, trace_id in pattern.findall(exposition)]


def _ids(span: ReadableSpan | trace.Span) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def test_receiver_histogram_exemplar_carries_the_sampled_trace_id(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing)
    sig = NS.signal("tr-exemplar")
    sig.connect(on_signup)
    sig.send("sender")  # no span: no exemplar
    assert _exemplar_ids(openmetrics_latest(registry).decode(), ON_SIGNUP) == []
    with tracing.parent() as parent:
        sig.send("sender")
    found = _exemplar_ids(openmetrics_latest(registry).decode(), ON_SIGNUP)
    assert found == [_ids(parent)]  # the span the send ran under (a request's, in an app)


def test_spans_none_makes_no_span_but_keeps_the_parent_s_exemplar(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    instrument(registry, tracing, spans="none")
    sig = NS.signal("tr-exemplar-no-spans")
    sig.connect(on_signup)
    with tracing.parent() as parent:
        sig.send("sender")
    assert [s.name for s in tracing.spans()] == ["parent"]
    found = _exemplar_ids(openmetrics_latest(registry).decode(), ON_SIGNUP)
    assert found == [_ids(parent)]


# --------------------------------------------------------------------------
# SDK set-up from the environment (in process: nothing here sets the global
# provider; the subprocess tests in test_export.py cover the real set-up)


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment without OTEL_* settings, and no global provider to hide behind."""
    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)
    assert not tracing_module.user_configured_provider(), "a test set the global provider"
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "service"),
    [
        ({}, "shop-app"),
        ({"OTEL_SERVICE_NAME": "from-service-name"}, "from-service-name"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attributes"}, "from-attributes"),
        (
            {
                "OTEL_SERVICE_NAME": "from-service-name",
                "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attributes",
            },
            "from-service-name",
        ),
    ],
)
def test_the_sdk_resource_names_the_service_as_the_user_said_else_after_the_app(
    otel_env: pytest.MonkeyPatch, env: dict[str, str], service: str
) -> None:
    for key, value in env.items():
        otel_env.setenv(key, value)
    otel_env.setenv("OTEL_RESOURCE_ATTRIBUTES", env.get("OTEL_RESOURCE_ATTRIBUTES", "") + ",team=a")
    attributes = tracing_module.sdk_resource("shop-app").attributes
    assert attributes["service.name"] == service
    assert attributes["team"] == "a"
    assert attributes["telemetry.sdk.name"] == "opentelemetry"


def _count_exporter_builds(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """Replace the exporter factory: record calls, build nothing (so no provider is set)."""
    calls: list[str | None] = []

    def fake(endpoint: str | None) -> None:
        calls.append(endpoint)

    monkeypatch.setattr(tracing_module, "_otlp_exporter", fake)
    return calls


@pytest.mark.parametrize(
    ("env", "builds"),
    [
        ({}, 1),
        ({"OTEL_SDK_DISABLED": "true"}, 0),
        ({"OTEL_TRACES_EXPORTER": "none"}, 0),
    ],
)
def test_setup_sdk_does_nothing_when_the_user_disabled_the_sdk(
    otel_env: pytest.MonkeyPatch, env: dict[str, str], builds: int
) -> None:
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    for key, value in env.items():
        otel_env.setenv(key, value)
    calls = _count_exporter_builds(otel_env)
    assert tracing_module.setup_sdk("shop-app") is None
    assert len(calls) == builds


def test_setup_sdk_logs_an_exporter_it_cannot_build_and_the_app_goes_on(
    otel_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    from opentelemetry.exporter.otlp.proto.grpc import trace_exporter

    def broken(**options: object) -> None:
        raise RuntimeError("the exporter cannot start: brotli")

    otel_env.setattr(trace_exporter, "OTLPSpanExporter", broken)
    with caplog.at_level(logging.ERROR, logger="sigtrace"):
        assert tracing_module.setup_sdk("shop-app") is None
    assert "spans are not exported" in caplog.text
    assert "brotli" in caplog.text
    assert not tracing_module.user_configured_provider()


def test_repeated_exporter_failures_are_logged_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(tracing_module.time, "monotonic", lambda: now[0])
    logger = logging.getLogger("tests.rate_limited")
    logger.propagate = False
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect()
    limit = tracing_module.RateLimitFilter(interval=60)
    logger.addHandler(handler)
    logger.addFilter(limit)
    try:
        for attempt in range(100):
            logger.error("Failed to export traces to %s, attempt %d", "collector:4317", attempt)
            logger.warning("Transient error, retrying in %.2fs", 1.0)
            now[0] += 0.5  # 100 failures in 50 s
        now[0] += 15  # a minute after the first one
        logger.error("Failed to export traces to %s, attempt %d", "collector:4317", 100)
    finally:
        logger.removeFilter(limit)
        logger.removeHandler(handler)
        logger.propagate = True
    assert records == [
        "Failed to export traces to collector:4317, attempt 0",
        "Transient error, retrying in 1.00s",
        "Failed to export traces to collector:4317, attempt 100 "
        "[sigtrace: 99 similar messages held back in the last 60 s]",
    ]


def test_receivers_called_counts_the_raising_receiver_and_not_the_ones_after(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    signal = NS.signal("payment-taken")
    signal.connect(charge_card)  # raises: the next receiver is never called
    signal.connect(on_signup)
    instrument(registry, tracing)
    with tracing.parent(), pytest.raises(PaymentDeclined):
        signal.send("shop")
    span = tracing.named("signal payment-taken")
    attributes = span.attributes or {}
    assert attributes["blinker.receivers.called"] == 1
    assert "blinker.receivers.count" not in attributes
    assert receiver_calls(registry, "payment-taken", ON_SIGNUP) is None


def test_the_send_makes_its_spans_current_as_the_opentelemetry_api_does(
    registry: CollectorRegistry, tracing: Tracing
) -> None:
    """sigtrace sets the current span through OpenTelemetry's ContextVar when it can:
    a receiver sees its span as current through the public API, and the caller's
    context is back after the send."""
    from sigtrace import spans as spans_module

    assert spans_module._VAR is not None, "the default runtime context is in use"
    instrument(registry, tracing)
    sig = NS.signal("tr-current")
    seen: list[trace.Span] = []
    sig.connect(lambda sender: seen.append(trace.get_current_span()), weak=False)
    with tracing.parent() as parent:
        before = otel_context.get_current()
        sig.send(None)
        assert otel_context.get_current() == before
        assert trace.get_current_span() is parent
    (receiver,) = [s for s in tracing.spans() if s.name.startswith("receiver ")]
    assert seen[0].get_span_context().span_id == receiver.context.span_id
