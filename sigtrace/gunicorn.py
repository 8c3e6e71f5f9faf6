"""gunicorn server hooks for sigtrace's multiprocess metrics.

Each gunicorn worker is a process with its own counters, so a scrape of
``/metrics`` that lands on one worker would see counts jump up and down.
prometheus-client's multiprocess mode fixes that: every worker writes its
values to files in ``PROMETHEUS_MULTIPROC_DIR`` and each scrape sums all the
files, dead workers' included, so counters never go back. sigtrace switches to
it whenever that variable is set. In ``gunicorn.conf.py``::

    from sigtrace.gunicorn import child_exit, when_ready  # noqa: F401

and start gunicorn with ``PROMETHEUS_MULTIPROC_DIR`` set to an existing,
empty directory (empty it before every start: stale files are counted too).

* :func:`child_exit` (in the master) removes a dead worker's live-gauge files
  (``mark_process_dead``); its counters and histograms stay and keep counting.
* :func:`when_ready` (in the master, before workers fork) starts the separate
  exposition server when ``SIGTRACE_METRICS_PORT`` is set in the environment.
  Workers cannot each bind that port; forked workers find the master's server
  in :mod:`sigtrace.exposition`'s table and reuse it, and the master serves
  every worker's metrics from the shared files.

No ``post_fork`` hook is needed. Without ``--preload`` each worker imports the
app and runs ``init_app`` itself: the instrumentation, metric families and
OpenTelemetry SDK (when sigtrace sets it up) are made after the fork. With
``--preload`` they are made in the master and inherited, which works too
(checked with opentelemetry-sdk 1.45 and grpcio 1.85): the SDK's
BatchSpanProcessor restarts its export thread in the child through
``os.register_at_fork`` (spans still queued in the master are exported by the
master only), the OTLP gRPC channel made in the master exports from the
children, and prometheus-client's multiprocess values notice the new pid and
open the worker's own files. With ``--preload`` a ``SIGTRACE_METRICS_PORT``
server starts in the master at ``init_app``, which makes :func:`when_ready`
unnecessary. Without ``PROMETHEUS_MULTIPROC_DIR`` nothing of this applies:
every worker keeps its own counters and only the app route is usable.
"""

from __future__ import annotations

import os
import typing as t

from .config import load_settings
from .metrics import multiprocess_mode

__all__ = ["child_exit", "when_ready"]


def child_exit(server: t.Any, worker: t.Any) -> None:
    """gunicorn ``child_exit``: forget the dead worker's live gauges.

    Does nothing outside multiprocess mode.
    """
    if not multiprocess_mode():
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def when_ready(server: t.Any) -> None:
    """gunicorn ``when_ready``: serve ``SIGTRACE_METRICS_PORT`` from the master.

    Reads the sigtrace settings of the environment (a bad value stops gunicorn
    at start, not every worker at boot). Does nothing when the port is unset or
    metrics are off; outside multiprocess mode it only warns, since the master
    would serve none of the workers' metrics.
    """
    settings = load_settings({}, os.environ)
    if not settings.metrics or settings.metrics_port is None:
        return
    if settings.metrics_port == 0:
        server.log.warning(
            "sigtrace: SIGTRACE_METRICS_PORT=0 binds a new port in every process; "
            "under gunicorn set a fixed port"
        )
        return
    if not multiprocess_mode():
        server.log.warning(
            "sigtrace: SIGTRACE_METRICS_PORT under gunicorn needs PROMETHEUS_MULTIPROC_DIR; "
            "without it each worker would need its own port"
        )
        return
    from .exposition import start_server

    port = start_server(
        settings.metrics_port, settings.metrics_addr, None, token=settings.metrics_token
    )
    server.log.info(
        "sigtrace: serving all workers' metrics on http://%s:%d/metrics",
        settings.metrics_addr,
        port,
    )
