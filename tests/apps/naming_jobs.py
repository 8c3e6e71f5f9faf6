"""Classes holding anonymous signals, sent from another module (tests/test_naming.py)."""

from __future__ import annotations

from blinker import Signal


class Job:
    finished = Signal()  # sent from naming_runner through an imported class


class Batch:
    done = Signal()  # sent from naming_runner through the imported module


class NightlyJob(Job):
    pass
