"""Benchmarks: sigtrace against bare Flask/blinker and its peers (docs/benchmarks.md)."""
