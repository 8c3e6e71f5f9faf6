"""gunicorn settings for the real-server run (``server.py`` sets the environment)."""

import os
import typing as t

if os.environ["BENCH_MODE"].startswith("sigtrace"):
    from sigtrace.gunicorn import *  # noqa: F403 (every hook it has, as docs/multiprocess.md lists)
elif os.environ["BENCH_MODE"].startswith("pfe"):  # as prometheus-flask-exporter's docs say
    from prometheus_flask_exporter.multiprocess import (  # type: ignore[import-untyped]
        GunicornInternalPrometheusMetrics,
    )

    def child_exit(server: t.Any, worker: t.Any) -> None:
        GunicornInternalPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)


bind = os.environ["BENCH_BIND"]
workers, worker_class = int(os.environ.get("BENCH_WORKERS", "2")), "sync"
timeout = 30 if workers > 1 else 600  # one worker: counted under valgrind, 50 times slower
loglevel, graceful_timeout = "warning", 3
control_socket_disable = True  # gunicorn >= 27: no shared control socket in $HOME
