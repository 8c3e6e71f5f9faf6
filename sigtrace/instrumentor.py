"""``BlinkerInstrumentor``: sigtrace for ``opentelemetry-instrument`` (zero code change).

Registered under the ``opentelemetry_instrumentor`` entry point as ``blinker``,
so ``opentelemetry-instrument flask run`` or ``opentelemetry-instrument gunicorn
app:app`` (with opentelemetry-distro installed) traces and measures every
blinker signal of the process; ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=blinker``
turns it off. The settings come from the environment (the ``SIGTRACE_*`` keys
of docs/configuration.md; there is no ``app.config`` at that point).

What it records: signal and receiver spans (under the current span, e.g.
opentelemetry-instrumentation-flask's server span) and the signal and receiver
metrics. Request spans and request metrics are opentelemetry-instrumentation-flask's
on this path (``SigTrace(app)`` adds sigtrace's own). The metrics live in
prometheus-client's registry of the process: pushed over OTLP when
``OTEL_METRICS_EXPORTER`` lists ``otlp`` (opentelemetry-distro's default), served
on ``SIGTRACE_METRICS_PORT`` when set, and on ``/metrics`` of any app that also
calls ``SigTrace(app)``.
"""

from __future__ import annotations

import functools
import typing as t
from collections.abc import Collection

from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

from . import dispatch, otlp_metrics
from .config import check_environment, check_exposure, load_settings

__all__ = ["BlinkerInstrumentor"]

_instruments = ("blinker >= 1.9",)


class BlinkerInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instrument blinker's ``Signal.send`` / ``send_async`` process-wide.

    ``BlinkerInstrumentor().instrument(tracer_provider=..., registry=...)``;
    both keyword arguments are optional (default: the global provider and
    prometheus-client's global registry).
    """

    _metrics_port: int | None = None  # the bound SIGTRACE_METRICS_PORT, for tests
    _stops: tuple[t.Callable[[], object], ...] = ()  # what undoes each start, in start order

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: t.Any) -> None:
        """Check every setting first, then start: a failure undoes what started."""
        settings = load_settings({})
        check_environment()
        stops: list[t.Callable[[], object]] = []
        if settings.metrics and settings.metrics_port is not None:
            from .exposition import start_configured_server, stop_server

            check_exposure(settings, metrics_auth=False)
            port = start_configured_server(settings, kwargs.get("registry"))
            stops.append(functools.partial(stop_server, port, settings.metrics_addr))
            self._metrics_port = port
        try:
            dispatch.instrument(
                settings.instrument_options(kwargs.get("registry"), kwargs.get("tracer_provider"))
            )
            stops.append(dispatch.uninstrument)
            metrics = dispatch.active_metrics() if settings.metrics else None
            if metrics is not None:
                pusher = otlp_metrics.start(metrics, None)  # with OTEL_METRICS_EXPORTER=otlp
                if pusher is not None:
                    stops.append(functools.partial(otlp_metrics.stop, pusher))
        except BaseException:
            self._metrics_port = None
            _undo(stops)
            raise
        self._stops = tuple(stops)

    def _uninstrument(self, **kwargs: t.Any) -> None:
        """Stop what :meth:`_instrument` started (its last user stops each thread)."""
        stops, self._stops = self._stops, ()
        self._metrics_port = None
        _undo(list(stops))


def _undo(stops: list[t.Callable[[], object]]) -> None:
    while stops:
        stops.pop()()
