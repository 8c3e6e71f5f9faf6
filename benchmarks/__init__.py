"""Benchmarks: sigtrace against bare Flask/blinker and its peers.

Run ``python -m benchmarks.run [--quick] [--profile]``; see ``benchmarks/README.md``.
Every measured configuration runs in its own subprocess, because the
instrumentations under test patch process-wide state (``blinker.Signal.send``,
the global tracer provider, ``Flask.wsgi_app``).
"""
