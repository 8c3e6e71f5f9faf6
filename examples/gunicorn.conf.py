"""gunicorn settings for the demo: multiprocess metrics across workers.

Set ``PROMETHEUS_MULTIPROC_DIR`` to a directory owned by the server's user,
mode 0700, outside tmp-cleaned paths (e.g. ``$XDG_RUNTIME_DIR/sigtrace-metrics``
or ``/run/<app>/metrics``); every worker publishes its values there and
``/metrics`` on any worker (or the master's ``SIGTRACE_METRICS_PORT`` server)
sums them.
"""

import os

# gunicorn looks these hooks up by name: on_starting checks the directory and
# removes sigtrace's files of an earlier run, worker_exit publishes an exiting
# worker's last values, child_exit archives a dead worker's file, when_ready
# starts SIGTRACE_METRICS_PORT's server once, in the master.
from sigtrace.gunicorn import child_exit, on_starting, when_ready, worker_exit  # noqa: F401

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
worker_class = "sync"
accesslog = "-"
control_socket_disable = True  # gunicorn >= 27: no shared control socket in $HOME
