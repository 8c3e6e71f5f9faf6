"""Sends racing ``instrument()`` / ``uninstrument()`` never fail and stay correct.

An app's worker threads keep sending while another thread instruments or, at
shutdown (``SigTrace.close()``, a test's teardown), runs the last
``uninstrument()``. Each send must finish as a correct blinker send, recorded
or not: it returns the receiver's value and raises nothing of sigtrace's own.

Each test runs a bounded number of instrument/uninstrument cycles (and stops
early after a few seconds on a slow machine); threads switch every few
bytecodes so the two sides really interleave. No assertion is about time.
"""

from __future__ import annotations

import asyncio
import threading
import time
import typing as t
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from blinker import NamedSignal, Signal
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

import sigtrace

CYCLES = 20_000
TIME_BOUND = 3.0  # seconds: a bound on the loop, never asserted
SENDERS = 2

pytestmark = pytest.mark.usefixtures("clean_otel_context", "frequent_thread_switches")


@pytest.fixture(autouse=True)
def not_instrumented() -> Iterator[None]:
    while sigtrace.is_instrumented():
        sigtrace.uninstrument()
    original = (Signal.__dict__["send"], Signal.__dict__["send_async"])
    yield
    while sigtrace.is_instrumented():
        sigtrace.uninstrument()
    assert (Signal.__dict__["send"], Signal.__dict__["send_async"]) == original, (
        "blinker's functions were not restored after the last uninstrument()"
    )


def sync_receiver(sender: object, **kwargs: object) -> tuple[str, object]:
    return ("sync", kwargs.get("n"))


async def async_receiver(sender: object, **kwargs: object) -> tuple[str, object]:
    return ("async", kwargs.get("n"))


class Senders:
    """Threads sending until told to stop; every failure or wrong result is kept."""

    def __init__(self, sender: Callable[[], Iterator[Callable[[int], None]]]) -> None:
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.sends = 0
        self._sender = sender  # a generator function: set up, yield send_one, clean up
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(SENDERS)]

    def _run(self) -> None:
        n = 0
        with contextmanager(self._sender)() as send_one:
            while not self.stop.is_set() and not self.failures:
                n += 1
                try:
                    send_one(n)
                except BaseException as exc:  # reported by the test
                    self.failures.append(f"send {n} raised {exc!r}")
                    return
                with self._lock:
                    self.sends += 1

    def __enter__(self) -> Senders:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in self._threads), "a sender hung"


def toggle(
    senders: Senders, instrument: Callable[[], None], uninstrument: Callable[[], None]
) -> int:
    """Instrument and uninstrument until the bound; returns the cycles run."""
    deadline = time.monotonic() + TIME_BOUND
    cycles = 0
    while cycles < CYCLES and not senders.failures and time.monotonic() < deadline:
        instrument()
        uninstrument()
        cycles += 1
    return cycles


def check_result(results: list[tuple[t.Any, t.Any]], receiver: t.Any, kind: str, n: int) -> None:
    if results != [(receiver, (kind, n))]:
        raise AssertionError(f"send {n} returned {results!r}")


def sync_sender(signal: Signal) -> Callable[[], Iterator[Callable[[int], None]]]:
    def sender() -> Iterator[Callable[[int], None]]:
        def send_one(n: int) -> None:
            check_result(signal.send("sender", n=n), sync_receiver, "sync", n)

        yield send_one

    return sender


BURST = 50  # send_async calls per run of the sending thread's event loop


def async_sender(signal: Signal) -> Callable[[], Iterator[Callable[[int], None]]]:
    """Each sending thread runs its own event loop, a burst of ``send_async`` at a time."""

    def sender() -> Iterator[Callable[[int], None]]:
        async def burst(start: int) -> None:
            for n in range(start * BURST, start * BURST + BURST):
                results = await signal.send_async("sender", n=n)
                check_result(results, async_receiver, "async", n)

        loop = asyncio.new_event_loop()
        try:
            yield lambda n: loop.run_until_complete(burst(n))
        finally:
            loop.close()

    return sender


def connected_sender(signal: Signal, kind: str) -> Callable[[], Iterator[Callable[[int], None]]]:
    """Connect the ``kind`` ("sync" or "async") receiver to ``signal``; its sender."""
    if kind == "sync":
        signal.connect(sync_receiver, weak=False)
        return sync_sender(signal)
    signal.connect(async_receiver, weak=False)
    return async_sender(signal)


def report(senders: Senders, cycles: int) -> str:
    return (
        f"{senders.failures[:3]} (after {cycles} instrument/uninstrument cycles, "
        f"{senders.sends} sends)"
    )


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_sends_racing_the_last_uninstrument_never_fail(kind: str) -> None:
    signal = NamedSignal("race")
    sender = connected_sender(signal, kind)
    registry = CollectorRegistry()
    with Senders(sender) as senders:
        cycles = toggle(
            senders, lambda: sigtrace.instrument(registry=registry), sigtrace.uninstrument
        )
    assert not senders.failures, report(senders, cycles)
    assert senders.sends > 0 and cycles > 0


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_sends_racing_nested_instrument_calls_never_fail(kind: str) -> None:
    """One instrumentation stays (an app's SigTrace); others come and go around it."""
    registry = CollectorRegistry()
    signal = NamedSignal("race.nested")
    sender = connected_sender(signal, kind)
    sigtrace.instrument(registry=registry)
    with Senders(sender) as senders:
        cycles = toggle(
            senders, lambda: sigtrace.instrument(registry=registry), sigtrace.uninstrument
        )
    assert not senders.failures, report(senders, cycles)
    # Instrumented throughout: every send was counted.
    total = sum(
        s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == "sigtrace_signal_sends_total" and s.labels == {"signal": "race.nested"}
    )
    sent = senders.sends * (1 if kind == "sync" else BURST)
    assert total == sent, f"{sent} sends while instrumented, {total} counted"


# --------------------------------------------------------------------------
# The same, deterministically: a receiver itself (un)instruments mid-send.


@pytest.mark.parametrize("spans", [False, True], ids=["metrics", "metrics and spans"])
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_send_during_which_the_last_uninstrument_runs_finishes_correctly(
    kind: str, spans: bool
) -> None:
    provider = TracerProvider()
    options: dict[str, t.Any] = {"tracer_provider": provider, "root_spans": True} if spans else {}
    signal = NamedSignal("race.mid_send")
    calls: list[str] = []

    def closing(sender: object, **kwargs: object) -> str:
        calls.append("closing")
        sigtrace.uninstrument()  # e.g. SigTrace.close() run from a receiver
        return "closing"

    def other(sender: object, **kwargs: object) -> str:
        calls.append("other")
        return "other"

    async def closing_async(sender: object, **kwargs: object) -> str:
        return closing(sender)

    async def other_async(sender: object, **kwargs: object) -> str:
        return other(sender)

    receivers = (closing, other) if kind == "sync" else (closing_async, other_async)
    for receiver in receivers:
        signal.connect(receiver, weak=False)
    try:
        for send in range(2):  # the first send binds the signal; the second uses the binding
            sigtrace.instrument(registry=CollectorRegistry(), **options)
            if kind == "sync":
                results = signal.send("sender")
            else:
                results = asyncio.run(signal.send_async("sender"))
            assert sorted(results, key=lambda pair: pair[1]) == list(
                zip(receivers, ["closing", "other"], strict=True)
            ), f"send {send}: {results}"
            assert not sigtrace.is_instrumented()
    finally:
        provider.shutdown()
    assert sorted(calls) == ["closing", "closing", "other", "other"]
