"""Benchmarks: sigtrace against bare Flask/blinker and its peers (the README's "Benchmarks")."""
