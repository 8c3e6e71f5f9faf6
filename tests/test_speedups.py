"""The histogram cores (C and pure Python) and the hot path's cheap context read.

The C core is what the hot path uses when it was built; the pure-Python core is
the fallback without a compiler. Both must count exactly the same way, so the
fallback is tested against the C core, value by value.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import os
import threading
import typing as t
from bisect import bisect_left

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from sigtrace import metrics, tracing
from sigtrace.metrics import DEFAULT_BUCKETS, FastHistogram, PyHistogramCore
from tests.conftest import run_threads

INF = float("inf")
BOUNDS = (*DEFAULT_BUCKETS, INF)

try:
    from sigtrace._speedups import Histogram as CHistogram
except ImportError:  # pragma: no cover - only where no compiler built it
    CHistogram = None  # type: ignore[assignment,misc]

CORES: list[t.Any] = [PyHistogramCore]
if CHistogram is not None:
    CORES.append(CHistogram)


def require_c_core() -> t.Any:
    """The C core; without it skip, or fail where CI demands it (STRICT_C_EXTENSION)."""
    if CHistogram is None:
        message = "sigtrace._speedups was not built (no C compiler at install time)"
        if os.environ.get("STRICT_C_EXTENSION"):
            pytest.fail(message + " [STRICT_C_EXTENSION is set, so this cannot skip]")
        pytest.skip(message)
    return CHistogram


def test_the_c_core_is_what_histograms_use_when_built() -> None:
    core = require_c_core()
    assert metrics.SPEEDUPS is True
    child = FastHistogram(BOUNDS)
    assert type(child.add.__self__) is core  # type: ignore[attr-defined]


def bucket_of(bounds: t.Sequence[float], amount: float) -> int:
    return bisect_left(bounds, amount)


@pytest.mark.parametrize("core", CORES, ids=lambda c: c.__name__)
def test_values_on_bounds_fall_in_their_own_bucket(core: t.Any) -> None:
    histogram = core((0.001, 0.01, INF))
    assert [histogram.add(v) for v in (0.0, 0.001, 0.0010001, 0.01, 0.5, INF)] == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    counts, total = histogram.snapshot()
    assert counts == [2.0, 2.0, 2.0]
    assert total == INF


finite = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
edge = st.sampled_from([*DEFAULT_BUCKETS, 0.0, INF, 5e-324, 1e-9])


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(finite, edge), max_size=300))
def test_c_and_python_cores_count_and_sum_alike(values: list[float]) -> None:
    c_core = require_c_core()(BOUNDS)
    py_core = PyHistogramCore(BOUNDS)
    for value in values:
        index = c_core.add(value)
        assert index == py_core.add(value) == bucket_of(BOUNDS, value)
    c_counts, c_sum = c_core.snapshot()
    py_counts, py_sum = py_core.snapshot()
    assert c_counts == py_counts
    assert sum(c_counts) == len(values)
    # Same values added in the same order: the same double, bit for bit.
    assert c_sum == py_sum or (math.isnan(c_sum) and math.isnan(py_sum))


@settings(max_examples=100, deadline=None)
@given(
    bounds=st.lists(finite, min_size=1, max_size=30, unique=True).map(
        lambda b: (*sorted(b), INF)
    ),
    values=st.lists(finite, max_size=100),
)
def test_cores_agree_on_any_bucket_layout(bounds: tuple[float, ...], values: list[float]) -> None:
    c_core = require_c_core()(bounds)
    py_core = PyHistogramCore(bounds)
    for value in values:
        assert c_core.add(value) == py_core.add(value) == bucket_of(bounds, value)
    assert c_core.snapshot() == py_core.snapshot()


def test_nan_lands_where_bisect_puts_it() -> None:
    c_core = require_c_core()(BOUNDS)
    py_core = PyHistogramCore(BOUNDS)
    assert c_core.add(math.nan) == py_core.add(math.nan) == bucket_of(BOUNDS, math.nan) == 0


@pytest.mark.parametrize(
    ("bounds", "error", "message"),
    [
        ((), ValueError, "must not be empty"),
        ((1.0, 2.0), ValueError, "must end with \\+Inf"),
        ((2.0, 1.0, INF), ValueError, "strictly increasing"),
        ((1.0, 1.0, INF), ValueError, "strictly increasing"),
        ((math.nan, INF), ValueError, "strictly increasing"),
        (("a", INF), TypeError, "must be real number"),
        (42, TypeError, "sequence of floats"),
    ],
)
def test_the_c_core_rejects_bad_bounds_naming_the_problem(
    bounds: t.Any, error: type[Exception], message: str
) -> None:
    core = require_c_core()
    with pytest.raises(error, match=message):
        core(bounds)


def test_the_c_core_rejects_non_numbers() -> None:
    histogram = require_c_core()(BOUNDS)
    with pytest.raises(TypeError):
        histogram.add("1.0")
    assert histogram.add(1) == bucket_of(BOUNDS, 1)  # ints are numbers
    assert sum(histogram.snapshot()[0]) == 1


@pytest.mark.parametrize("core", CORES, ids=lambda c: c.__name__)
def test_threads_lose_no_observation(core: t.Any) -> None:
    histogram = core(BOUNDS)
    threads_n, adds_n = 8, 20_000

    def work(n: int) -> None:
        value = DEFAULT_BUCKETS[n]  # each thread its own bucket
        for _ in range(adds_n):
            histogram.add(value)

    run_threads(threads_n, work)
    counts, total = histogram.snapshot()
    assert counts[:threads_n] == [float(adds_n)] * threads_n
    assert sum(counts) == threads_n * adds_n
    assert total == pytest.approx(adds_n * sum(DEFAULT_BUCKETS[:threads_n]))


@pytest.mark.parametrize("core", CORES, ids=lambda c: c.__name__)
def test_exposition_is_the_same_whichever_core(core: t.Any) -> None:
    from prometheus_client import generate_latest

    def exposition(chosen: t.Any) -> bytes:
        histogram = FastHistogram(BOUNDS, core=chosen)
        for value in (1e-6, 3e-5, 0.002, 0.2, 7.0, 100.0):
            histogram.observe(value)
        registry = CollectorRegistry()

        class One(Collector):
            def collect(self) -> t.Iterable[t.Any]:
                family = metrics.Family(
                    "x_seconds", "doc", ("signal",), "histogram", DEFAULT_BUCKETS, 10,
                    registry, multiprocess=False,
                )  # fmt: skip
                family._children[("s",)] = histogram
                yield family.collect()

        registry.register(One())
        return generate_latest(registry)

    assert exposition(core) == exposition(PyHistogramCore)
    assert b'x_seconds_bucket{le="+Inf",signal="s"} 6.0' in exposition(core)


# --------------------------------------------------------------------------
# tracing.current_context / recording_parent: the hot path's span check


def test_current_context_is_the_public_current_context(clean_otel_context: None) -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("t")
    assert tracing.current_context() is otel_context.get_current()
    with tracer.start_as_current_span("outer"):
        assert tracing.current_context() is otel_context.get_current()
        with tracer.start_as_current_span("inner"):
            assert tracing.current_context() is otel_context.get_current()
        assert tracing.current_context() is otel_context.get_current()
    assert tracing.current_context() is otel_context.get_current()

    seen: list[bool] = []

    def in_thread() -> None:
        seen.append(tracing.current_context() is otel_context.get_current())

    with tracer.start_as_current_span("threaded"):
        thread = threading.Thread(target=contextvars.copy_context().run, args=(in_thread,))
        thread.start()
        thread.join(timeout=10)
        plain = threading.Thread(target=in_thread)
        plain.start()
        plain.join(timeout=10)
    assert seen == [True, True]

    async def in_task() -> bool:
        with tracer.start_as_current_span("task"):
            await asyncio.sleep(0)
            return tracing.current_context() is otel_context.get_current()

    async def main() -> list[bool]:
        return list(await asyncio.gather(in_task(), in_task()))

    assert asyncio.run(main()) == [True, True]


def test_recording_parent_matches_the_public_check(clean_otel_context: None) -> None:
    def public() -> bool:
        return trace.get_current_span().is_recording()

    assert tracing.recording_parent() is public() is False
    unsampled = NonRecordingSpan(SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(0)))
    token = otel_context.attach(trace.set_span_in_context(unsampled))
    try:
        assert tracing.recording_parent() is public() is False
    finally:
        otel_context.detach(token)
    span = TracerProvider().get_tracer("t").start_span("sampled")
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        assert tracing.recording_parent() is public() is True
        span.end()  # ended but still current: no longer recording
        assert tracing.recording_parent() is public() is False
    finally:
        otel_context.detach(token)


def test_another_runtime_context_falls_back_to_the_public_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class OtherRuntimeContext:
        _current_context = contextvars.ContextVar("other")

    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", OtherRuntimeContext())
    assert tracing._context_getter() is otel_context.get_current
    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", object())
    assert tracing._context_getter() is otel_context.get_current


def test_without_the_c_extension_sigtrace_falls_back_and_records_the_same(
    tmp_path: t.Any,
) -> None:
    """An install where no compiler built sigtrace._speedups (import blocked here)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import sys
        sys.modules["sigtrace._speedups"] = None  # what a missing extension looks like
        import blinker, sigtrace
        from prometheus_client import CollectorRegistry, generate_latest
        from sigtrace import metrics
        registry = CollectorRegistry()
        sigtrace.instrument(registry=registry, tracing_enabled=False)
        sig = blinker.Namespace().signal("fallback")
        def receiver(sender, **kwargs):
            return 1
        sig.connect(receiver)
        for _ in range(5):
            assert sig.send(None) == [(receiver, 1)]
        print(metrics.SPEEDUPS)
        print(generate_latest(registry).decode())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    first, exposition = done.stdout.split("\n", 1)
    assert first == "False"
    assert 'sigtrace_signal_duration_seconds_count{signal="fallback"} 5.0' in exposition
    receiver_count = 'receiver="__main__.receiver",signal="fallback"} 5.0'
    assert "sigtrace_receiver_duration_seconds_count{" + receiver_count in exposition
