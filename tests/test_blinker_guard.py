"""A blinker whose ``send`` / ``send_async`` changed shape is left unpatched.

sigtrace replaces blinker's ``Signal.send`` and ``send_async`` with traced
copies written for their present signatures. A later blinker whose functions
gain or rename a parameter would be silently diverged from, so
``instrument()`` must check the shape, log one clear warning and leave blinker
alone: the app runs as without sigtrace, unrecorded. Each test fakes such a
blinker by replacing the function on ``Signal`` before ``instrument()``.
"""

from __future__ import annotations

import asyncio
import logging
import typing as t
from collections.abc import Callable, Iterator

import pytest
from blinker import NamedSignal, Signal
from prometheus_client import CollectorRegistry

import sigtrace

BLINKER_SEND = Signal.__dict__["send"]
BLINKER_SEND_ASYNC = Signal.__dict__["send_async"]


# Each fake keeps blinker's behaviour (it delegates) and changes only the shape.
def send_with_a_new_parameter(
    self: Signal,
    sender: t.Any = None,
    /,
    *,
    _async_wrapper: t.Any = None,
    _new_option: t.Any = None,
    **kwargs: t.Any,
) -> t.Any:
    return BLINKER_SEND(self, sender, _async_wrapper=_async_wrapper, **kwargs)


def send_with_a_renamed_parameter(
    self: Signal, sender: t.Any = None, /, *, _wrapper: t.Any = None, **kwargs: t.Any
) -> t.Any:
    return BLINKER_SEND(self, sender, _async_wrapper=_wrapper, **kwargs)


def send_with_a_keyword_sender(
    self: Signal, sender: t.Any = None, *, _async_wrapper: t.Any = None, **kwargs: t.Any
) -> t.Any:
    return BLINKER_SEND(self, sender, _async_wrapper=_async_wrapper, **kwargs)


async def send_async_with_a_new_parameter(
    self: Signal,
    sender: t.Any = None,
    /,
    *,
    _sync_wrapper: t.Any = None,
    _new_option: t.Any = None,
    **kwargs: t.Any,
) -> t.Any:
    return await BLINKER_SEND_ASYNC(self, sender, _sync_wrapper=_sync_wrapper, **kwargs)


CHANGES: dict[str, tuple[str, Callable[..., t.Any]]] = {
    "send gains a parameter": ("send", send_with_a_new_parameter),
    "send renames _async_wrapper": ("send", send_with_a_renamed_parameter),
    "send's sender is no longer positional-only": ("send", send_with_a_keyword_sender),
    "send_async gains a parameter": ("send_async", send_async_with_a_new_parameter),
}


@pytest.fixture
def uninstrumented() -> Iterator[None]:
    """Nothing instrumented before or after (before monkeypatch restores blinker)."""
    while sigtrace.is_instrumented():
        sigtrace.uninstrument()
    yield
    while sigtrace.is_instrumented():
        sigtrace.uninstrument()


def sigtrace_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.split(".")[0] == "sigtrace"]


def total_sends(registry: CollectorRegistry) -> float:
    return sum(
        s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == "sigtrace_signal_sends_total"
    )


def receiver(sender: object, **kwargs: object) -> str:
    return "sync"


async def async_receiver(sender: object, **kwargs: object) -> str:
    return "async"


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_blinker_is_left_unpatched_with_one_warning(
    change: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    uninstrumented: None,
) -> None:
    attribute, fake = CHANGES[change]
    monkeypatch.setattr(Signal, attribute, fake)
    before = (Signal.__dict__["send"], Signal.__dict__["send_async"])
    registry = CollectorRegistry()
    sync_signal, async_signal = NamedSignal("guard.sync"), NamedSignal("guard.async")
    sync_signal.connect(receiver, weak=False)
    async_signal.connect(async_receiver, weak=False)

    with caplog.at_level(logging.DEBUG):
        sigtrace.instrument(registry=registry)
        assert (Signal.__dict__["send"], Signal.__dict__["send_async"]) == before, (
            f"{change}: instrument() patched a blinker it was not written for"
        )
        warnings = [r for r in sigtrace_records(caplog) if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, (
            f"{change}: expected one warning from sigtrace, got "
            f"{[r.getMessage() for r in sigtrace_records(caplog)]}"
        )
        message = warnings[0].getMessage()
        assert "blinker" in message.lower() and attribute in message, (
            f"the warning must name blinker and Signal.{attribute}: {message!r}"
        )

        # The app runs as without sigtrace, and nothing is recorded.
        assert sync_signal.send("sender") == [(receiver, "sync")]
        assert asyncio.run(async_signal.send_async("sender")) == [(async_receiver, "async")]
        assert total_sends(registry) == 0

        sigtrace.uninstrument()
        assert (Signal.__dict__["send"], Signal.__dict__["send_async"]) == before
        assert sync_signal.send("sender") == [(receiver, "sync")]
        assert len([r for r in sigtrace_records(caplog) if r.levelno >= logging.WARNING]) == 1, (
            "sends and uninstrument() must not warn again"
        )


def test_the_installed_blinker_is_patched_without_a_warning(
    caplog: pytest.LogCaptureFixture, uninstrumented: None
) -> None:
    """The control: the blinker sigtrace was written for is instrumented and counted."""
    registry = CollectorRegistry()
    signal = NamedSignal("guard.control")
    signal.connect(receiver, weak=False)
    with caplog.at_level(logging.DEBUG):
        sigtrace.instrument(registry=registry)
        try:
            assert Signal.__dict__["send"] is not BLINKER_SEND
            assert Signal.__dict__["send_async"] is not BLINKER_SEND_ASYNC
            assert signal.send("sender") == [(receiver, "sync")]
        finally:
            sigtrace.uninstrument()
    assert Signal.__dict__["send"] is BLINKER_SEND
    assert Signal.__dict__["send_async"] is BLINKER_SEND_ASYNC
    assert total_sends(registry) == 1
    assert not [r for r in sigtrace_records(caplog) if r.levelno >= logging.WARNING]
