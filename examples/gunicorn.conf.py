"""gunicorn settings for the demo: multiprocess metrics across workers.

Set ``PROMETHEUS_MULTIPROC_DIR`` to an empty, writable directory before
starting gunicorn; ``/metrics`` then aggregates every worker, and
``child_exit`` removes a dead worker's live gauges.
"""

import os

from sigtrace.gunicorn import child_exit  # noqa: F401  (gunicorn looks it up by name)

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
worker_class = "sync"
accesslog = "-"
