"""The traced send keeps blinker's semantics exactly (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import asyncio
import gc
import inspect
import traceback
import typing as t
import weakref

import blinker
import pytest
from blinker import ANY, Signal
from prometheus_client import CollectorRegistry

import sigtrace
from tests.conftest import sample


def test_uninstrument_restores_the_original_functions(registry: CollectorRegistry) -> None:
    send, send_async = Signal.send, Signal.send_async
    sigtrace.instrument(registry=registry)
    sigtrace.instrument(registry=registry)
    assert Signal.send is not send
    sigtrace.uninstrument()
    assert Signal.send is not send, "still one instrument() outstanding"
    sigtrace.uninstrument()
    assert Signal.send is send
    assert Signal.send_async is send_async
    sigtrace.uninstrument()  # extra calls are harmless
    assert Signal.send is send


def test_signatures_match_blinker(instrumented: CollectorRegistry) -> None:
    params = inspect.signature(Signal.send).parameters
    assert params["sender"].kind is inspect.Parameter.POSITIONAL_ONLY
    assert params["_async_wrapper"].kind is inspect.Parameter.KEYWORD_ONLY
    async_params = inspect.signature(Signal.send_async).parameters
    assert async_params["sender"].kind is inspect.Parameter.POSITIONAL_ONLY
    assert async_params["_sync_wrapper"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.iscoroutinefunction(Signal.send_async)


def test_results_hold_the_original_receivers(instrumented: CollectorRegistry) -> None:
    sig = Signal()

    def first(sender: object) -> str:
        return "one"

    class Holder:
        def method(self, sender: object) -> str:
            return "two"

    holder = Holder()
    sig.connect(first)
    sig.connect(holder.method)
    results = dict(sig.send("s"))
    assert results[first] == "one"
    assert first in results and next(r for r in results if r is first) is first
    assert results[holder.method] == "two"


def test_sender_keyword_reaches_receivers(instrumented: CollectorRegistry) -> None:
    # blinker's meta-signals send ``sender=`` as a keyword argument.
    seen: list[dict[str, object]] = []
    sig = Signal()
    sig.receiver_connected.connect(lambda s, **kw: seen.append(kw), weak=False)

    def receiver(sender: object) -> None:
        return None

    sig.connect(receiver, sender="x")
    assert seen == [{"receiver": receiver, "sender": "x", "weak": True}]


def test_muted_send_returns_fresh_list_and_records_nothing(
    instrumented: CollectorRegistry,
) -> None:
    sig = blinker.Namespace().signal("muted-one")
    calls: list[object] = []
    sig.connect(calls.append, weak=False)
    with sig.muted():
        first = sig.send("s")
        second = sig.send("s")
    assert first == [] and second == [] and first is not second
    assert calls == []
    assert sample(instrumented, "sigtrace_signal_sends_total", signal="muted-one") is None


class _OrderedSet(dict[t.Any, None]):
    """A set that iterates in insertion order: blinker's receivers_for yields
    receivers in the order of its ``set_class``, which for ``set`` is not the
    order of connection."""

    def add(self, item: t.Any) -> None:
        self[item] = None

    def discard(self, item: t.Any) -> None:
        self.pop(item, None)

    def __or__(self, other: t.Any) -> _OrderedSet:
        merged = _OrderedSet(self)
        merged.update(other)
        return merged

    def copy(self) -> _OrderedSet:
        return _OrderedSet(self)


class OrderedSignal(Signal):
    """Calls its receivers in the order they were connected."""

    set_class = _OrderedSet  # type: ignore[assignment]


@pytest.mark.parametrize(
    "error", [KeyError("k"), SystemExit(3)], ids=["Exception", "BaseException"]
)
def test_exception_propagates_as_the_same_object_and_stops_later_receivers(
    instrumented: CollectorRegistry, error: BaseException
) -> None:
    sig = OrderedSignal()
    order: list[str] = []

    def earlier(sender: object) -> None:
        order.append("earlier")

    def raising(sender: object) -> None:
        order.append("raising")
        raise error

    def later(sender: object) -> None:
        order.append("later")

    for receiver in (earlier, raising, later):
        sig.connect(receiver, weak=False)
    with pytest.raises(type(error)) as caught:
        sig.send("s")
    assert caught.value is error
    frames = traceback.extract_tb(caught.value.__traceback__)
    assert frames[-1].name == "raising"
    assert frames[-1].line == "raise error"
    assert order == ["earlier", "raising"]


def test_any_and_sender_filtering(instrumented: CollectorRegistry) -> None:
    sig = Signal()
    got: list[tuple[str, object]] = []

    def for_any(sender: object) -> None:
        got.append(("any", sender))

    def for_a(sender: object) -> None:
        got.append(("a", sender))

    sig.connect(for_any, sender=ANY)
    sig.connect(for_a, sender="a")
    sig.send("a")
    sig.send("b")
    assert sorted(got, key=str) == sorted([("any", "a"), ("a", "a"), ("any", "b")], key=str)


def test_subclass_receivers_for_override_is_used(instrumented: CollectorRegistry) -> None:
    class OnlyFirst(Signal):
        def receivers_for(self, sender: t.Any) -> t.Generator[t.Any, None, None]:
            yield from list(super().receivers_for(sender))[:1]

    sig = OnlyFirst()
    calls: list[str] = []
    a = lambda s: calls.append("a")  # noqa: E731
    b = lambda s: calls.append("b")  # noqa: E731
    sig.connect(a)
    sig.connect(b)
    assert len(sig.send(None)) == 1
    assert len(calls) == 1


def test_disconnect_during_send(instrumented: CollectorRegistry) -> None:
    sig = Signal()
    calls: list[str] = []

    def first(sender: object) -> None:
        calls.append("first")
        sig.disconnect(second)
        sig.disconnect(first)

    def second(sender: object) -> None:
        calls.append("second")

    sig.connect(first)
    sig.connect(second)
    sig.send(None)
    assert "first" in calls
    sig.send(None)
    assert calls.count("first") == 1
    assert not sig.receivers


def test_weak_receiver_is_collected_while_instrumented(instrumented: CollectorRegistry) -> None:
    sig = blinker.Namespace().signal("weak-one")

    class Listener:
        def on(self, sender: object) -> str:
            return "heard"

    listener = Listener()
    sig.connect(listener.on)
    ref = weakref.ref(listener)
    assert [r for _, r in sig.send(None)] == ["heard"]
    del listener
    gc.collect()
    assert ref() is None, "sigtrace kept the receiver alive"
    assert sig.send(None) == []
    assert not sig.receivers


def test_send_keeps_no_reference_to_sender_kwargs_or_results(
    instrumented: CollectorRegistry,
) -> None:
    sig = Signal()

    class Thing:
        pass

    def receiver(sender: object, **kwargs: object) -> Thing:
        return Thing()

    sig.connect(receiver)
    sender, payload = Thing(), Thing()
    results = sig.send(sender, payload=payload)
    refs = [weakref.ref(sender), weakref.ref(payload), weakref.ref(results[0][1])]
    del sender, payload, results
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_coroutine_receiver_without_wrapper_raises_blinkers_error(
    instrumented: CollectorRegistry,
) -> None:
    sig = Signal()

    async def receiver(sender: object) -> None:
        return None

    sig.connect(receiver)
    with pytest.raises(RuntimeError, match=r"Cannot send to a coroutine function\."):
        sig.send(None)


def test_sync_receiver_in_send_async_without_wrapper_raises(
    instrumented: CollectorRegistry,
) -> None:
    sig = Signal()

    def receiver(sender: object) -> None:
        return None

    sig.connect(receiver)
    with pytest.raises(RuntimeError, match=r"Cannot send to a non-coroutine function\."):
        asyncio.run(sig.send_async(None))


def _hist(registry: CollectorRegistry, signal: str, receiver: str) -> tuple[float, float]:
    count = sample(
        registry, "sigtrace_receiver_duration_seconds_count", signal=signal, receiver=receiver
    )
    total = sample(
        registry, "sigtrace_receiver_duration_seconds_sum", signal=signal, receiver=receiver
    )
    assert count is not None and total is not None
    return count, total


async def slow_async_receiver(sender: object, **kwargs: object) -> str:
    await asyncio.sleep(0.05)
    return "awaited"


def test_send_async_times_the_awaited_work(instrumented: CollectorRegistry) -> None:
    sig = blinker.Namespace().signal("async-one")
    sig.connect(slow_async_receiver)
    results = asyncio.run(sig.send_async("s"))
    assert results == [(slow_async_receiver, "awaited")]
    count, total = _hist(instrumented, "async-one", f"{__name__}.slow_async_receiver")
    assert count == 1
    assert total >= 0.045, "timed the coroutine's creation, not the awaited work"


def test_async_wrapper_path_times_the_awaited_work(instrumented: CollectorRegistry) -> None:
    sig = blinker.Namespace().signal("async-two")
    sig.connect(slow_async_receiver)

    def wrapper(func: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        def run(*args: t.Any, **kwargs: t.Any) -> t.Any:
            return asyncio.run(func(*args, **kwargs))

        return run

    results = sig.send("s", _async_wrapper=wrapper)
    assert results == [(slow_async_receiver, "awaited")]
    count, total = _hist(instrumented, "async-two", f"{__name__}.slow_async_receiver")
    assert count == 1 and total >= 0.045


def test_sync_wrapper_is_used_for_sync_receivers_in_send_async(
    instrumented: CollectorRegistry,
) -> None:
    sig = Signal()

    def receiver(sender: object) -> str:
        return "sync"

    def wrapper(func: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        async def run(*args: t.Any, **kwargs: t.Any) -> t.Any:
            return func(*args, **kwargs)

        return run

    sig.connect(receiver)
    assert asyncio.run(sig.send_async(None, _sync_wrapper=wrapper)) == [(receiver, "sync")]


def test_async_receiver_exception_propagates_and_is_counted(
    instrumented: CollectorRegistry,
) -> None:
    sig = blinker.Namespace().signal("async-err")
    error = ValueError("bad")

    async def failing(sender: object) -> None:
        await asyncio.sleep(0)
        raise error

    sig.connect(failing)
    with pytest.raises(ValueError) as caught:
        asyncio.run(sig.send_async(None))
    assert caught.value is error
    name = f"{__name__}.test_async_receiver_exception_propagates_and_is_counted.<locals>.failing"
    assert (
        sample(
            instrumented,
            "sigtrace_receiver_errors_total",
            signal="async-err",
            receiver=name,
            exception="ValueError",
        )
        == 1
    )


def test_flask_style_meta_signal_sender_none(instrumented: CollectorRegistry) -> None:
    sig = Signal()
    seen: list[object] = []
    sig.connect(lambda sender: seen.append(sender), weak=False)
    sig.send()
    assert seen == [None]
