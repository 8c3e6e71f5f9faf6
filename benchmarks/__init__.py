"""Benchmarks: sigtrace against bare Flask/blinker and its peers, on pyperf.

Run ``python -m benchmarks.run [--quick]``; see ``benchmarks/README.md``.
"""
