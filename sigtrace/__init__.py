"""sigtrace: OpenTelemetry spans and Prometheus metrics for every blinker signal.

``SigTrace(app)`` instruments a Flask app; :func:`instrument` /
:func:`uninstrument` instrument blinker process-wide without Flask.
"""

from __future__ import annotations

from .config import ConfigError
from .dispatch import instrument, is_instrumented, uninstrument
from .extension import SigTrace
from .options import Options
from .version import __version__

__all__ = [
    "ConfigError",
    "Options",
    "SigTrace",
    "__version__",
    "instrument",
    "is_instrumented",
    "uninstrument",
]
