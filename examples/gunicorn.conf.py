"""gunicorn settings for the demo: multiprocess metrics across workers.

Set ``PROMETHEUS_MULTIPROC_DIR`` to an empty, writable directory before
starting gunicorn; ``/metrics`` then aggregates every worker, and
``child_exit`` removes a dead worker's live gauges.
"""

import os

# gunicorn looks these hooks up by name: child_exit marks dead workers' files,
# when_ready starts SIGTRACE_METRICS_PORT's server once, in the master.
from sigtrace.gunicorn import child_exit, when_ready  # noqa: F401

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
worker_class = "sync"
accesslog = "-"
control_socket_disable = True  # gunicorn >= 27: no shared control socket in $HOME
