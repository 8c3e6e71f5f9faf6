"""Benchmarks: sigtrace against bare Flask/blinker and its peers (``benchmarks/README.md``)."""
