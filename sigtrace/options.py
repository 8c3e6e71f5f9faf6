"""The options of :func:`sigtrace.instrument`: one frozen object, compared field by field."""

from __future__ import annotations

import dataclasses
import typing as t
from collections.abc import Iterable

import prometheus_client
from opentelemetry import trace

from .metrics import DEFAULT_BUCKETS, DEFAULT_MAX_LABEL_VALUES
from .tracing import DEFAULT_SLOW_THRESHOLD, SPAN_MODES, SpanMode

__all__ = ["MAX_SLOW_THRESHOLD", "Options"]

MAX_SLOW_THRESHOLD = 3600.0
"""Upper bound of ``slow_threshold`` (and ``SIGTRACE_SLOW_THRESHOLD``), in seconds."""


@dataclasses.dataclass(frozen=True)
class Options:
    """How blinker is instrumented, process-wide.

    :param registry: where metrics go; ``prometheus_client.REGISTRY`` by default.
    :param tracer_provider: where spans go; the global provider by default.
    :param metrics: record Prometheus metrics.
    :param tracing_enabled: make spans (under a recording parent span).
    :param spans: which spans: ``all``, ``signals``, ``receivers``, ``slow`` or ``none``.
    :param slow_threshold: under ``slow``, the seconds a send or receiver must take for
        its span to be exported (failing ones, and those with spans under them, always are).
    :param root_spans: make spans for sends outside any span, too.
    :param include: signal-name patterns (``fnmatch``) to record; empty means all.
    :param exclude: signal-name patterns never recorded.
    :param record_kwargs: the send kwargs whose values go into signal spans.
    :param buckets: histogram bucket bounds, in seconds.
    :param max_label_values: distinct values a label may take; later ones are capped.
    """

    registry: t.Any = None
    tracer_provider: trace.TracerProvider | None = None
    metrics: bool = True
    tracing_enabled: bool = True
    spans: SpanMode = "all"
    slow_threshold: float = DEFAULT_SLOW_THRESHOLD
    root_spans: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    record_kwargs: frozenset[str] = frozenset()
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    max_label_values: int = DEFAULT_MAX_LABEL_VALUES

    def __post_init__(self) -> None:
        if self.spans not in SPAN_MODES:
            raise ValueError(f"spans must be one of {SPAN_MODES}, got {self.spans!r}")
        threshold = self.slow_threshold
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0 < threshold <= MAX_SLOW_THRESHOLD
        ):
            raise ValueError(
                f"slow_threshold must be a positive number of seconds up to "
                f"{MAX_SLOW_THRESHOLD:g}, got {threshold!r}"
            )
        object.__setattr__(self, "slow_threshold", float(threshold))
        normalise: dict[str, t.Callable[[Iterable[t.Any]], t.Any]] = {
            "include": tuple,
            "exclude": tuple,
            "record_kwargs": frozenset,
            "buckets": lambda values: tuple(float(v) for v in values),
        }
        for name, make in normalise.items():
            object.__setattr__(self, name, make(getattr(self, name)))
        if self.registry is None:
            object.__setattr__(self, "registry", prometheus_client.REGISTRY)

    def first_difference(self, other: Options) -> str | None:
        """The name of the first option whose value differs from ``other``'s."""
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            same = (
                mine is theirs
                if field.name in ("registry", "tracer_provider")
                else (mine == theirs)
            )
            if not same:
                return field.name
        return None
