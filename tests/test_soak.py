"""Soak: many sends while receivers, objects and signals come and go.

Memory must stay flat (traced Python memory, measured after a collection at
ten checkpoints: the growth over the second half stays under a small bound),
sigtrace's caches must stay bounded by what is alive, and every metric family
must keep within the label cap plus the overflow value, although the run keeps
making signals and receivers with names never seen before.

By default a short variant runs (``SOAK_SENDS``, default 100,000 sends). The
full run, a million sends::

    SOAK_SENDS=1000000 .venv/bin/pytest tests/test_soak.py -s

(``-s`` shows the memory at each checkpoint and the time taken.)
"""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from blinker import NamedSignal
from prometheus_client import CollectorRegistry, generate_latest

import sigtrace
from sigtrace import dispatch, naming
from sigtrace.metrics import OVERFLOW_VALUE

SENDS = int(os.environ.get("SOAK_SENDS", "100000"))
CHECKPOINTS = 10
CAP = 20
SENDS_PER_ROUND = 4
# Second-half growth allowed: far below what keeping anything per send or per
# distinct name would cost (tens of bytes each, times tens of thousands).
GROWTH_BOUND = 256 * 1024
CACHE_BOUND = 100  # receivers and signals alive at any time: a handful


class Subscriber:
    """A short-lived object whose bound method is connected weakly."""

    def __init__(self) -> None:
        self.seen = 0

    def on_event(self, sender: object, **kwargs: object) -> None:
        self.seen += 1


class Ledger:
    """A long-lived object with a bound-method receiver."""

    def __init__(self) -> None:
        self.total = 0

    def on_event(self, sender: object, **kwargs: object) -> None:
        self.total += 1


def on_event(sender: object, **kwargs: object) -> None:
    return None


def named_receiver(name: str) -> Callable[..., None]:
    """A fresh function with a name never seen before (plugins, generated code)."""

    def receiver(sender: object, **kwargs: object) -> None:
        return None

    receiver.__qualname__ = name
    return receiver


@pytest.fixture
def traced_memory() -> Iterator[None]:
    tracemalloc.start()
    yield
    tracemalloc.stop()


def run_round(steady: NamedSignal, round_number: int) -> None:
    """Four sends: steady receivers, a dropped object, a connected-and-disconnected
    receiver with a new name, and a new signal with a new name."""
    steady.send("soak", n=round_number)
    subscriber = Subscriber()
    steady.connect(subscriber.on_event)
    steady.send("soak", n=round_number)
    del subscriber  # its weakly connected method goes with it
    receiver = named_receiver(f"handler_{round_number}")
    steady.connect(receiver)
    steady.send("soak", n=round_number)
    steady.disconnect(receiver)
    dynamic = NamedSignal(f"dynamic-{round_number}")
    dynamic.connect(receiver)
    dynamic.send("soak", n=round_number)


def label_values(registry: CollectorRegistry) -> dict[tuple[str, str], set[str]]:
    """Distinct values of each (family, label) pair in the exposition."""
    values: dict[tuple[str, str], set[str]] = {}
    for family in registry.collect():
        for s in family.samples:
            for label, value in s.labels.items():
                if label not in ("le", "quantile"):
                    values.setdefault((family.name, label), set()).add(value)
    return values


@pytest.mark.soak
def test_memory_caches_and_labels_stay_bounded(
    registry: CollectorRegistry, traced_memory: None
) -> None:
    sigtrace.instrument(registry=registry, max_label_values=CAP)
    steady = NamedSignal("soak-steady")
    ledger = Ledger()
    steady.connect(on_event)
    steady.connect(ledger.on_event)
    rounds = SENDS // SENDS_PER_ROUND
    per_checkpoint = rounds // CHECKPOINTS
    memory: list[int] = []
    caches: list[tuple[int, int]] = []
    started = time.perf_counter()
    for checkpoint in range(CHECKPOINTS):
        for offset in range(per_checkpoint):
            run_round(steady, checkpoint * per_checkpoint + offset)
        # Recorded durations wait up to a second to be folded into buckets (by
        # a scrape or the fold thread): measure what stays, after a scrape.
        generate_latest(registry)
        gc.collect()
        memory.append(tracemalloc.get_traced_memory()[0])
        active = dispatch._active
        assert active is not None
        caches.append((len(naming._receivers), len(active.signals)))
    elapsed = time.perf_counter() - started
    print(
        f"\nsoak: {SENDS} sends in {elapsed:.1f} s; traced memory at checkpoints (bytes): "
        f"{memory}; (receiver cache, signal bindings) sizes: {caches}"
    )

    assert ledger.total == rounds * 3, "the steady receiver missed sends"
    growth = memory[-1] - memory[CHECKPOINTS // 2 - 1]
    assert growth < GROWTH_BOUND, (
        f"traced memory grew by {growth} bytes over the second half of {SENDS} sends "
        f"({growth / (SENDS / 2):.1f} bytes a send): something keeps state per send or "
        f"per distinct signal/receiver name; memory at checkpoints: {memory}"
    )
    assert all(r < CACHE_BOUND and p < CACHE_BOUND for r, p in caches), (
        f"sigtrace's caches grew with the sends instead of with what is alive: {caches}"
    )
    for (family, label), values in label_values(registry).items():
        assert len(values) <= CAP + 1, (
            f"{family}{{{label}}} took {len(values)} values, past the cap of {CAP} + overflow"
        )
    sends = label_values(registry)[("sigtrace_signal_sends", "signal")]
    assert OVERFLOW_VALUE in sends and "soak-steady" in sends
