"""gunicorn entry point for the real-server run: ``benchmarks.wsgi:app``.

The mode comes from ``BENCH_MODE`` (a name from :data:`benchmarks.apps.MODES`).
gunicorn imports this module in each worker after the fork (no ``--preload``),
so the SDK's batch thread starts in the worker.
"""

import os

from . import apps

app = apps.build(os.environ["BENCH_MODE"]).app
