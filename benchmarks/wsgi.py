"""gunicorn entry point for the real-server run: ``benchmarks.wsgi:app``.

The mode comes from ``BENCH_MODE`` (a name from :data:`benchmarks.apps.MODES`;
not a ``SIGTRACE_*`` name, which sigtrace would reject as an unknown setting).
gunicorn imports this module in each worker after fork (no ``--preload``), so
the SDK's batch thread starts in the worker, where it must.
"""

from __future__ import annotations

import os

from . import apps

mode = os.environ.get("BENCH_MODE", "bare")
app = apps.build(mode).app
