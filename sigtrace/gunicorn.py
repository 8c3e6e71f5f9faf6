"""gunicorn server hooks for sigtrace's multiprocess metrics.

In ``gunicorn.conf.py``::

    from sigtrace.gunicorn import (  # noqa: F401
        child_exit, on_starting, when_ready, worker_exit,
    )

with ``PROMETHEUS_MULTIPROC_DIR`` set to a directory owned by the workers'
user, mode 0700. The docs page "Multiple processes" (docs/multiprocess.md)
explains the set-up; :mod:`sigtrace.multiprocess_directory` how the workers'
values are merged.

* :func:`on_starting` (in the master, once) checks the directory, refusing to
  start with the reason when the workers could not use it, and removes
  sigtrace's files of an earlier run: a new run starts from zero.
* :func:`worker_exit` (in a worker, as it exits) publishes its last values.
* :func:`child_exit` (in the master) archives the dead worker's file and
  removes its prometheus-client live-gauge files.
* :func:`when_ready` (in the master) serves ``SIGTRACE_METRICS_PORT`` (and the
  signals page with ``SIGTRACE_UI``).

Apart from :func:`on_starting`'s refusal at start, no hook lets an exception
of sigtrace reach gunicorn: it is logged, and the server goes on.
"""

from __future__ import annotations

import os
import typing as t

from . import multiprocess_directory, multiprocess_publisher
from .config import ConfigError, check_exposure, load_settings

__all__ = ["child_exit", "on_starting", "when_ready", "worker_exit"]


def on_starting(server: t.Any) -> None:
    """gunicorn ``on_starting``: check the directory, and start this run from zero.

    The directory must be private to the server: owned by the workers' user
    (gunicorn's ``user``, else the master's) or root, writable by no one else
    (see ``SIGTRACE_MULTIPROC_ALLOW_SHARED_DIR``), and writable by the
    workers. Otherwise gunicorn stops here with the reason. sigtrace's own
    files of an earlier run are removed (prometheus-client's are left alone).
    """
    path = multiprocess_directory.directory()
    if path is None:
        return
    try:
        settings = load_settings({}, os.environ)
        worker_uid = int(getattr(server.cfg, "uid", os.geteuid()))
        if worker_uid != os.geteuid():
            multiprocess_directory.trust_owner(worker_uid)
        multiprocess_directory.check_directory(
            path, allow_shared=settings.multiproc_allow_shared_dir
        )
        owner = os.stat(path).st_uid
        mismatch = owner not in (0, os.geteuid(), worker_uid) or worker_uid not in (owner, 0)
        if mismatch and not settings.multiproc_allow_shared_dir:
            raise ConfigError(
                f"{multiprocess_directory.ENV}={path!r} is owned by uid {owner}, but "
                f"gunicorn's workers run as uid {worker_uid} (its `user` setting): they "
                f"must own it to write their metrics there, and no other user may: "
                f"`chown {worker_uid} {path} && chmod 0700 {path}`"
            )
    except ConfigError as error:
        raise SystemExit(f"sigtrace: {error}") from None
    multiprocess_publisher.mark_checked(path)
    try:
        removed = multiprocess_directory.clear(path)
    except Exception as error:
        server.log.warning("sigtrace: cannot clear %s of an earlier run: %r", path, error)
        return
    if removed:
        server.log.info(
            "sigtrace: removed %d file(s) of an earlier run from %s", len(removed), path
        )


def worker_exit(server: t.Any, worker: t.Any) -> None:
    """gunicorn ``worker_exit``: publish this worker's last values (graceful exit).

    ``atexit`` does it too; this hook also covers exits that skip it.
    """
    try:
        multiprocess_publisher.stop_all()
    except Exception as error:
        server.log.warning("sigtrace: cannot publish worker %s's metrics: %r", worker.pid, error)


def child_exit(server: t.Any, worker: t.Any) -> None:
    """gunicorn ``child_exit``: archive the dead worker's values.

    Also forgets its prometheus-client live gauges (``mark_process_dead``), and
    writes the master's own failure counts (an archive that failed) where
    every scrape reads them.
    Does nothing outside multiprocess mode; waits at most
    :data:`sigtrace.multiprocess_directory.LOCK_TIMEOUT` for the lock.
    """
    path = multiprocess_directory.directory()
    if path is None:
        return
    try:
        multiprocess_directory.archive_dead(path)
    except Exception as error:
        multiprocess_directory.report("archive_failed", path, repr(error))
        server.log.warning("sigtrace: cannot archive worker %s's metrics: %r", worker.pid, error)
    multiprocess_directory.publish_errors(path)
    try:
        from prometheus_client import multiprocess as client_multiprocess

        client_multiprocess.mark_process_dead(worker.pid, path)  # type: ignore[no-untyped-call]
    except Exception as error:
        server.log.warning(
            "sigtrace: cannot remove worker %s's prometheus-client files: %r", worker.pid, error
        )


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
    if multiprocess_directory.directory() is None:
        server.log.warning(
            "sigtrace: SIGTRACE_METRICS_PORT under gunicorn needs PROMETHEUS_MULTIPROC_DIR; "
            "without it each worker would need its own port"
        )
        return
    from .exposition import start_configured_server

    check_exposure(settings, metrics_auth=False)
    page = None
    if settings.ui:
        from .ui import Dashboard

        # The master records nothing itself: the page shows the workers' merged
        # metrics; slow sends are kept by each worker, so it has none.
        page = Dashboard(
            path=settings.ui_path,
            app_name="gunicorn master",
            metrics=None,
            tracer_provider=None,
            tracing_enabled=False,
            slow_threshold=settings.slow_threshold,
            trace_url=settings.trace_url,
        )
    port = start_configured_server(settings, None, gunicorn_master=True, ui=page)
    server.log.info(
        "sigtrace: serving all workers' metrics on http://%s:%d/metrics",
        settings.metrics_addr,
        port,
    )
