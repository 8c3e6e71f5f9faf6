"""Anonymous class-attribute signals are named after their attribute whatever
the first sender: also when the first send comes from another module with
sender ``None``. The label is read back from a real scrape of ``/metrics``
and from ``flask sigtrace signals --json``.
"""

from __future__ import annotations

import json
import typing as t
import weakref
from collections.abc import Iterator

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry

from sigtrace import SigTrace, naming
from tests.apps import naming_jobs, naming_runner
from tests.conftest import samples_from_text

JOB_FINISHED = "tests.apps.naming_jobs.Job.finished"
BATCH_DONE = "tests.apps.naming_jobs.Batch.done"


def on_job(sender: object, **kwargs: object) -> None:
    return None


@pytest.fixture
def app(registry: CollectorRegistry) -> Iterator[Flask]:
    app = Flask("naming")
    app.config["SIGTRACE_TRACING"] = False
    naming_jobs.Job.finished.connect(on_job)
    naming_jobs.Batch.done.connect(on_job)
    ext = SigTrace(app, registry=registry)
    try:
        yield app
    finally:
        ext.close()
        naming_jobs.Job.finished.disconnect(on_job)
        naming_jobs.Batch.done.disconnect(on_job)


def sends(app: Flask) -> dict[str, float]:
    text = app.test_client().get("/metrics").text
    return {
        dict(labels)["signal"]: value
        for (name, labels), value in samples_from_text(text).items()
        if name == "sigtrace_signal_sends_total"
    }


def cli_signals(app: Flask) -> dict[str, dict[str, t.Any]]:
    result = app.test_cli_runner().invoke(args=["sigtrace", "signals", "--json"])
    assert result.exit_code == 0, result.output
    return {signal["name"]: signal for signal in json.loads(result.output)["signals"]}


def test_first_sent_with_sender_none_through_an_imported_class(app: Flask) -> None:
    naming_runner.finish_job()  # Job.finished.send(None), in another module
    naming_jobs.Job.finished.send(naming_jobs.Job())
    naming_jobs.Job.finished.send(naming_jobs.NightlyJob())
    counted = sends(app)
    assert counted.get(JOB_FINISHED) == 3.0, counted
    assert naming.ANONYMOUS_SIGNAL not in counted
    listed = cli_signals(app)[JOB_FINISHED]
    assert listed["sends"] == 3
    assert [(r["name"], r["calls"]) for r in listed["receivers"]] == [
        ("tests.test_naming.on_job", 3)
    ]


def test_first_sent_with_sender_none_through_an_imported_module(app: Flask) -> None:
    naming_runner.finish_batch()  # naming_jobs.Batch.done.send(None)
    naming_jobs.Batch.done.send(None)
    counted = sends(app)
    assert counted.get(BATCH_DONE) == 2.0, counted
    assert naming.ANONYMOUS_SIGNAL not in counted
    assert cli_signals(app)[BATCH_DONE]["sends"] == 2


class _BrokenMeta(type):
    @property
    def __mro__(cls) -> t.Any:  # type: ignore[override]
        raise RuntimeError("no mro")


class Unreadable(metaclass=_BrokenMeta):
    pass


def test_a_class_that_cannot_be_read_does_not_stop_the_search() -> None:
    signal = naming_jobs.Job.finished
    namespace = {"Unreadable": Unreadable, "Job": naming_jobs.Job}
    assert naming._visible_class_attribute(signal, namespace) == JOB_FINISHED


class Later:
    """Holds a signal only after its first send (assigned at run time)."""


def test_a_signal_left_anonymous_is_found_through_a_later_sender() -> None:
    from blinker import Signal

    def make_and_send() -> Signal:
        signal = Signal()
        assert naming.signal_name(signal, None) == naming.ANONYMOUS_SIGNAL
        return signal

    signal = make_and_send()
    tried: weakref.WeakSet[type] = weakref.WeakSet()
    assert naming.later_signal_name(signal, None, tried) is None
    assert naming.later_signal_name(signal, Later(), tried) is None  # not there yet
    Later.ready = signal  # type: ignore[attr-defined]
    try:
        # Later was already looked through for this signal: one lookup per sender type.
        assert naming.later_signal_name(signal, Later(), tried) is None

        class LaterStill(Later):
            pass

        found = naming.later_signal_name(signal, LaterStill(), tried)
        assert found == "tests.test_naming.Later.ready"
        assert naming.later_signal_name(signal, LaterStill, tried) is None  # tried already
    finally:
        del Later.ready  # type: ignore[attr-defined]


def test_an_anonymous_signal_is_renamed_when_a_later_sender_reveals_it() -> None:
    """End to end: sent first with None from here (no module global, no class
    holding it yet), then by an instance of the class that holds it."""
    from blinker import Signal
    from prometheus_client import CollectorRegistry

    import sigtrace

    class Holder:
        pass

    def make() -> Signal:
        return Signal()

    registry = CollectorRegistry()
    signal = make()
    signal.connect(lambda sender, **kw: None, weak=False)
    sigtrace.instrument(registry=registry)
    try:
        signal.send(None)
        Holder.done = signal  # type: ignore[attr-defined]
        signal.send(Holder())
        signal.send(Holder())
    finally:
        sigtrace.uninstrument()
    name = f"{__name__}.{Holder.__qualname__}.done"
    sends = "sigtrace_signal_sends_total"
    assert registry.get_sample_value(sends, {"signal": "anonymous"}) == 1
    assert registry.get_sample_value(sends, {"signal": name}) == 2
