"""gunicorn settings for the real-server run, as the README tells users to run it.

``PROMETHEUS_MULTIPROC_DIR`` is set (to an empty directory) by the run;
sigtrace's modes use its hooks, prometheus-flask-exporter's mode its own
gunicorn class's. ``BENCH_MODE`` and ``BENCH_BIND`` come from the run.
"""

import os
import typing as t

mode = os.environ["BENCH_MODE"]
if mode.startswith("sigtrace"):
    from sigtrace.gunicorn import *  # noqa: F403 (every hook it has, as the README lists)
elif mode.startswith("pfe"):
    from prometheus_flask_exporter.multiprocess import (  # type: ignore[import-untyped]
        GunicornInternalPrometheusMetrics,
    )

    def child_exit(server: t.Any, worker: t.Any) -> None:
        GunicornInternalPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)


bind = os.environ["BENCH_BIND"]
workers = 2
worker_class = "sync"
loglevel = "warning"
graceful_timeout = 3
control_socket_disable = True  # gunicorn >= 27: no shared control socket in $HOME
