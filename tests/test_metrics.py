"""Metric samples after sends: exact values, names, labels, the cap, threads."""

from __future__ import annotations

import functools
import logging
import time
import typing as t
from unittest import mock

import blinker
import pytest
from blinker import Signal
from prometheus_client import CollectorRegistry, generate_latest

import sigtrace
from sigtrace import naming
from sigtrace.metrics import DEFAULT_BUCKETS, OVERFLOW_VALUE, TALLY_INTERVAL, metric_set
from tests.conftest import run_threads, sample, series

NS = blinker.Namespace()


def on_signup(sender: object, **kwargs: object) -> None:
    return None


class Counter:
    def on_signup(self, sender: object, **kwargs: object) -> None:
        return None

    @classmethod
    def on_class(cls, sender: object, **kwargs: object) -> None:
        return None

    @staticmethod
    def on_static(sender: object, **kwargs: object) -> None:
        return None


class CallableReceiver:
    def __call__(self, sender: object, **kwargs: object) -> None:
        return None


def test_exact_counts_after_n_sends(instrumented: CollectorRegistry) -> None:
    sig = NS.signal("exact-counts")
    sig.connect(on_signup)
    for _ in range(7):
        sig.send("s")
    receiver = f"{__name__}.on_signup"
    assert sample(instrumented, "sigtrace_signal_sends_total", signal="exact-counts") == 7
    assert (
        sample(instrumented, "sigtrace_signal_duration_seconds_count", signal="exact-counts") == 7
    )
    assert (
        sample(
            instrumented,
            "sigtrace_receiver_duration_seconds_count",
            signal="exact-counts",
            receiver=receiver,
        )
        == 7
    )
    inf_bucket = sample(
        instrumented,
        "sigtrace_receiver_duration_seconds_bucket",
        signal="exact-counts",
        receiver=receiver,
        le="+Inf",
    )
    assert inf_bucket == 7


def test_default_buckets_resolve_microseconds(instrumented: CollectorRegistry) -> None:
    assert DEFAULT_BUCKETS[0] <= 0.00001
    sig = NS.signal("fast-one")
    sig.connect(on_signup)
    sig.send(None)
    first = sample(
        instrumented,
        "sigtrace_receiver_duration_seconds_bucket",
        signal="fast-one",
        receiver=f"{__name__}.on_signup",
        le="0.0001",
    )
    assert first == 1, "a trivial receiver should land below 100 µs"


def test_errors_by_exception_class(instrumented: CollectorRegistry) -> None:
    sig = NS.signal("errors-by-class")
    errors: list[BaseException] = [KeyError("a"), KeyError("b"), ValueError("c")]

    def failing(sender: object) -> None:
        raise errors.pop(0)

    sig.connect(failing)
    for _ in range(3):
        with pytest.raises((KeyError, ValueError)):
            sig.send(None)
    name = f"{__name__}.test_errors_by_exception_class.<locals>.failing"
    key = {"signal": "errors-by-class", "receiver": name}
    assert sample(instrumented, "sigtrace_receiver_errors_total", **key, exception="KeyError") == 2
    assert (
        sample(instrumented, "sigtrace_receiver_errors_total", **key, exception="ValueError") == 1
    )
    # Failed calls are still timed.
    assert sample(instrumented, "sigtrace_receiver_duration_seconds_count", **key) == 3


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: on_signup, f"{__name__}.on_signup"),
        (lambda: Counter().on_signup, f"{__name__}.Counter.on_signup"),
        (lambda: Counter.on_class, f"{__name__}.Counter.on_class"),
        (lambda: Counter.on_static, f"{__name__}.Counter.on_static"),
        (lambda: functools.partial(on_signup, extra=1), f"{__name__}.on_signup"),
        (
            lambda: functools.partial(functools.partial(Counter.on_static), extra=1),
            f"{__name__}.Counter.on_static",
        ),
        (lambda: CallableReceiver(), f"{__name__}.CallableReceiver.__call__"),
        (lambda: LAMBDA, f"{__name__}.<lambda>"),
        (lambda: mock.Mock(), "unittest.mock.Mock.__call__"),
        (lambda: mock.MagicMock(), "unittest.mock.MagicMock.__call__"),
        (lambda: print, "builtins.print"),
        (lambda: [].append, "builtins.list.append"),
    ],
    ids=[
        "function",
        "method",
        "classmethod",
        "staticmethod",
        "partial",
        "nested-partial",
        "callable-object",
        "lambda",
        "mock",
        "magicmock",
        "builtin",
        "builtin-method",
    ],
)
def test_receiver_label_for_each_callable_kind(
    instrumented: CollectorRegistry, make: t.Callable[[], t.Any], expected: str
) -> None:
    receiver = make()
    sig = Signal()
    sig.connect(receiver, weak=False)
    sig.send(None)
    labels = series(instrumented, "sigtrace_receiver_duration_seconds_count")
    assert [lb["receiver"] for lb in labels] == [expected]
    assert "0x" not in expected


LAMBDA = lambda sender, **kw: None  # noqa: E731


def test_naming_never_raises_on_hostile_callables() -> None:
    class Meta(type):
        def __getattribute__(cls, name: str) -> t.Any:
            raise RuntimeError("no attributes for you")

    class Hostile(metaclass=Meta):
        def __call__(self, sender: object) -> None:
            return None

    assert naming.receiver_name(Hostile()) == naming.UNKNOWN_RECEIVER
    assert naming.receiver_name(functools.partial(Hostile())) == naming.UNKNOWN_RECEIVER


def test_receiver_names_are_cached_without_keeping_receivers_alive() -> None:
    import gc
    import weakref

    class Listener:
        def __call__(self, sender: object) -> None:
            return None

    listener = Listener()
    first = naming.receiver_info(listener)
    assert naming.receiver_info(listener) is first
    ref = weakref.ref(listener)
    del listener
    gc.collect()
    assert ref() is None
    assert id(first) not in {id(v) for _, v in naming._receivers.live()}


class Processor:
    on_ready = Signal()

    def run(self) -> None:
        self.on_ready.send(self)


module_level_anonymous = Signal()


def test_anonymous_class_signal_is_named_after_its_attribute(
    instrumented: CollectorRegistry,
) -> None:
    Processor.on_ready.connect(on_signup)
    try:
        Processor().run()
    finally:
        Processor.on_ready.disconnect(on_signup)
    labels = series(instrumented, "sigtrace_signal_sends_total")
    assert {"signal": f"{__name__}.Processor.on_ready"} in labels


def test_anonymous_module_signal_is_named_after_its_global(
    instrumented: CollectorRegistry,
) -> None:
    module_level_anonymous.send(None)
    labels = series(instrumented, "sigtrace_signal_sends_total")
    assert {"signal": f"{__name__}.module_level_anonymous"} in labels


def test_unfindable_anonymous_signal_gets_the_fixed_name(instrumented: CollectorRegistry) -> None:
    def make_and_send() -> None:
        local = Signal()
        local.send(None)

    make_and_send()
    labels = series(instrumented, "sigtrace_signal_sends_total")
    assert {"signal": naming.ANONYMOUS_SIGNAL} in labels


def test_label_cap_records_new_values_as_overflow_with_one_warning(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    sigtrace.instrument(registry=registry, max_label_values=3)
    with caplog.at_level(logging.WARNING, logger="sigtrace"):
        for i in range(6):
            NS.signal(f"capped-{i}").send(None)
    labels = {lb["signal"] for lb in series(registry, "sigtrace_signal_sends_total")}
    assert labels == {"capped-0", "capped-1", "capped-2", OVERFLOW_VALUE}
    assert sample(registry, "sigtrace_signal_sends_total", signal=OVERFLOW_VALUE) == 3
    warnings = [r for r in caplog.records if "distinct values" in r.getMessage()]
    assert len(warnings) == 1


def test_include_and_exclude_patterns(registry: CollectorRegistry) -> None:
    sigtrace.instrument(registry=registry, include=["orders-*"], exclude=["orders-debug"])
    calls: list[str] = []
    for name in ("orders-created", "orders-debug", "users-created"):
        sig = NS.signal(name)
        sig.connect(lambda s, name=name: calls.append(name), weak=False)
        assert len(sig.send(None)) == 1
    assert calls == ["orders-created", "orders-debug", "users-created"]
    names = {lb["signal"] for lb in series(registry, "sigtrace_signal_sends_total")}
    assert names == {"orders-created"}


def test_families_are_created_once_per_registry(registry: CollectorRegistry) -> None:
    first = metric_set(registry)
    assert metric_set(registry) is first
    for _ in range(3):
        sigtrace.instrument(registry=registry)
    for _ in range(3):
        sigtrace.uninstrument()
    sigtrace.instrument(registry=registry)
    text = generate_latest(registry).decode()
    assert text.count("# TYPE sigtrace_signal_sends_total counter") == 1


def test_second_instrument_with_another_registry_is_refused(registry: CollectorRegistry) -> None:
    sigtrace.instrument(registry=registry)
    with pytest.raises(ValueError, match="another registry"):
        sigtrace.instrument(registry=CollectorRegistry())


def test_metrics_can_be_turned_off(registry: CollectorRegistry) -> None:
    sigtrace.instrument(registry=registry, metrics=False)
    sig = NS.signal("metrics-off")
    sig.connect(on_signup)
    assert len(sig.send(None)) == 1
    assert series(registry, "sigtrace_signal_sends_total") == []


def test_threads_lose_no_count(instrumented: CollectorRegistry) -> None:
    sig = NS.signal("threaded")
    sig.connect(on_signup)
    empty = NS.signal("threaded-empty")
    threads_n, sends_n = 8, 5000

    def work(_index: int) -> None:
        for _ in range(sends_n):
            sig.send(None)
            empty.send(None)

    run_threads(threads_n, work)
    total = threads_n * sends_n
    assert sample(instrumented, "sigtrace_signal_sends_total", signal="threaded") == total
    assert sample(instrumented, "sigtrace_signal_sends_total", signal="threaded-empty") == total
    assert (
        sample(instrumented, "sigtrace_signal_duration_seconds_count", signal="threaded") == total
    )
    receiver = f"{__name__}.on_signup"
    assert (
        sample(
            instrumented,
            "sigtrace_receiver_duration_seconds_count",
            signal="threaded",
            receiver=receiver,
        )
        == total
    )
    assert (
        sample(
            instrumented,
            "sigtrace_receiver_duration_seconds_bucket",
            signal="threaded",
            receiver=receiver,
            le="+Inf",
        )
        == total
    )


def test_a_histogram_series_appears_at_its_first_observation(registry: CollectorRegistry) -> None:
    quiet = blinker.Signal()  # never reaches a receiver: counted, never timed
    busy = blinker.NamedSignal("busy")
    busy.connect(lambda sender, **kw: None, weak=False)
    sigtrace.instrument(registry=registry)
    quiet.send("x")
    body = generate_latest(registry).decode()
    assert 'sigtrace_signal_sends_total{signal="anonymous"} 1.0' in body
    assert 'sigtrace_signal_duration_seconds_count{signal="anonymous"}' not in body
    assert 'sigtrace_signal_duration_seconds_count{signal="busy"}' not in body
    busy.send("x")
    body = generate_latest(registry).decode()
    assert 'sigtrace_signal_duration_seconds_count{signal="busy"} 1.0' in body


def test_a_second_instrument_with_other_options_names_the_option(
    registry: CollectorRegistry,
) -> None:
    sigtrace.instrument(registry=registry, spans="all")
    with pytest.raises(ValueError, match=r"another spans .*'all'.*'signals'"):
        sigtrace.instrument(registry=registry, spans="signals")
    with pytest.raises(ValueError, match="another buckets"):
        sigtrace.instrument(registry=registry, buckets=(0.1, 1.0))
    sigtrace.instrument(sigtrace.Options(registry=registry))  # the same options: accepted
    sigtrace.uninstrument()
    sigtrace.uninstrument()
    assert not sigtrace.is_instrumented()


def test_recorded_durations_are_tallied_without_any_scrape(registry: CollectorRegistry) -> None:
    """The per-process tally thread bounds what waits in a histogram's list."""
    signal = blinker.NamedSignal("folded")
    signal.connect(lambda sender, **kw: None, weak=False)
    sigtrace.instrument(registry=registry)
    for _ in range(1000):
        signal.send("x")
    child = metric_set(registry).signal_duration.child("folded")
    waiting = [len(child._pending)]
    deadline = 10 * TALLY_INTERVAL
    started = time.monotonic()
    while child._pending and time.monotonic() - started < deadline:
        time.sleep(TALLY_INTERVAL / 10)
    waiting.append(len(child._pending))
    assert waiting[-1] == 0, f"values still waiting after {deadline} s: {waiting}"
    assert sum(child._counts) == 1000  # tallied, not dropped
