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

import typing as t
from collections.abc import Collection

from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

from . import dispatch, otlp_metrics
from .config import ConfigError, load_settings

__all__ = ["BlinkerInstrumentor"]

_instruments = ("blinker >= 1.9",)


class BlinkerInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instrument blinker's ``Signal.send`` / ``send_async`` process-wide.

    ``BlinkerInstrumentor().instrument(tracer_provider=..., registry=...)``;
    both keyword arguments are optional (default: the global provider and
    prometheus-client's global registry).
    """

    _metrics_port: int | None = None
    _metrics_addr: str = "127.0.0.1"

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: t.Any) -> None:
        settings = load_settings({})
        dispatch.instrument(
            settings.instrument_options(kwargs.get("registry"), kwargs.get("tracer_provider"))
        )
        metrics = dispatch.active_metrics() if settings.metrics else None
        if metrics is None:
            return
        try:
            otlp_metrics.start(metrics, None)  # only with OTEL_METRICS_EXPORTER=otlp
            if settings.metrics_port is not None:
                from .exposition import ServerConflict, start_server

                try:
                    port = start_server(
                        settings.metrics_port,
                        settings.metrics_addr,
                        kwargs.get("registry"),
                        token=settings.metrics_token,
                    )
                except ServerConflict as error:
                    raise ConfigError(
                        f"SIGTRACE_METRICS_PORT={settings.metrics_port!r}: {error}"
                    ) from None
                except OSError as error:
                    raise ConfigError(
                        f"SIGTRACE_METRICS_PORT={settings.metrics_port!r}: cannot serve "
                        f"metrics on {settings.metrics_addr}:{settings.metrics_port} ({error})"
                    ) from error
                self._metrics_port, self._metrics_addr = port, settings.metrics_addr
        except ConfigError:
            dispatch.uninstrument()
            raise

    def _uninstrument(self, **kwargs: t.Any) -> None:
        if self._metrics_port is not None:
            from .exposition import stop_server

            stop_server(self._metrics_port, self._metrics_addr)
            self._metrics_port = None
        dispatch.uninstrument()
