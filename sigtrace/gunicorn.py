"""gunicorn server hooks for sigtrace's multiprocess metrics.

In ``gunicorn.conf.py``::

    from sigtrace.gunicorn import child_exit, when_ready, worker_exit  # noqa: F401

with ``PROMETHEUS_MULTIPROC_DIR`` set to an existing, empty directory. The docs
page "Multiple processes" (docs/multiprocess.md) explains the set-up;
:mod:`sigtrace.multiprocess` how the workers' values are merged.

* :func:`worker_exit` (in a worker, as it exits) publishes its last values.
* :func:`child_exit` (in the master) folds the dead worker's file into the
  archive and removes its prometheus-client live-gauge files.
* :func:`when_ready` (in the master) serves ``SIGTRACE_METRICS_PORT``.
"""

from __future__ import annotations

import os
import typing as t

from . import multiprocess
from .config import load_settings

__all__ = ["child_exit", "when_ready", "worker_exit"]


def worker_exit(server: t.Any, worker: t.Any) -> None:
    """gunicorn ``worker_exit``: publish this worker's last values (graceful exit).

    ``atexit`` does it too; this hook also covers exits that skip it.
    """
    multiprocess.flush()


def child_exit(server: t.Any, worker: t.Any) -> None:
    """gunicorn ``child_exit``: fold the dead worker's values into the archive.

    Also forgets its prometheus-client live gauges (``mark_process_dead``).
    Does nothing outside multiprocess mode; never raises into gunicorn.
    """
    path = multiprocess.directory()
    if path is None:
        return
    from prometheus_client import multiprocess as client_multiprocess

    try:
        multiprocess.fold(path)
        client_multiprocess.mark_process_dead(worker.pid, path)  # type: ignore[no-untyped-call]
    except OSError as error:
        server.log.warning("sigtrace: cannot fold worker %s's metrics: %s", worker.pid, error)


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
    if multiprocess.directory() is None:
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
