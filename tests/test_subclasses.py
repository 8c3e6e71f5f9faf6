"""``Signal`` subclasses behave exactly as without sigtrace.

blinker's ``Signal`` is meant to be subclassed, and a subclass may do anything
a Python class can: be unhashable, raise from ``__hash__``, ``__eq__``,
``__repr__`` or ``__getattr__``, compute ``name``, ``receivers`` or
``is_muted``, override ``receivers_for`` / ``has_receivers_for``, or wrap
``send`` itself. Each test builds such a subclass, sends through it once
without sigtrace and once with ``sigtrace.instrument()``, and compares what the
app can see: the results (same receiver objects, same values), the exception
(the very object a receiver or the subclass raised; for blinker's own errors
the same type and message), and the log of calls (receivers, wrappers and the
subclass's own hooks, in order). blinker's ``send`` touches only ``is_muted``
and ``receivers_for``; a traced send that touches more (``has_receivers_for``),
or calls a hook twice, shows in the log.

It must also still count: each instrumented run scrapes a fresh registry, where
``sigtrace_signal_sends_total`` rose by one per unmuted send, under the signal's
name when it has a readable one, else under a fallback name.

The same trait builders serve the one-trait tests and the property test that
combines them (hypothesis).
"""

from __future__ import annotations

import asyncio
import typing as t
from collections.abc import Callable, Coroutine, Generator, Iterator

import pytest
from blinker import NamedSignal, Signal
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import sigtrace

pytestmark = pytest.mark.usefixtures("clean_otel_context")

SIGNAL_NAME = "subclass.signal"
SENDS = 2  # the first send binds the signal, the second takes the cached path

# Everything the app can observe during a send, in order: receiver calls,
# wrapper calls and the subclass's own hooks.
EVENTS: list[tuple[t.Any, ...]] = []


class SubclassError(Exception):
    """Raised by a subclass's own code (a property, ``__hash__``, ...)."""


class ReceiverError(Exception):
    """Raised by a receiver."""


# One instance each, so "the same exception object" can be checked across runs.
SUBCLASS_ERROR = SubclassError("raised by the subclass itself")
SYNC_ERROR = ReceiverError("raised by a sync receiver")
ASYNC_ERROR = ReceiverError("raised by an async receiver")
OWN_ERRORS = (SubclassError, ReceiverError)


# --------------------------------------------------------------------------
# Receivers (module-level functions: the same objects in every run)


def sync_a(sender: object, **kwargs: object) -> str:
    EVENTS.append(("sync_a", sender, kwargs))
    return "a"


def sync_c(sender: object, **kwargs: object) -> str:
    EVENTS.append(("sync_c", sender, kwargs))
    return "c"


def sync_fails(sender: object, **kwargs: object) -> str:
    EVENTS.append(("sync_fails", sender, kwargs))
    raise SYNC_ERROR


def sync_extra(sender: object, **kwargs: object) -> str:
    EVENTS.append(("sync_extra", sender, kwargs))
    return "extra"


async def async_b(sender: object, **kwargs: object) -> str:
    EVENTS.append(("async_b", sender, kwargs))
    await asyncio.sleep(0)
    return "b"


async def async_d(sender: object, **kwargs: object) -> str:
    EVENTS.append(("async_d", sender, kwargs))
    return "d"


async def async_fails(sender: object, **kwargs: object) -> str:
    EVENTS.append(("async_fails", sender, kwargs))
    await asyncio.sleep(0)
    raise ASYNC_ERROR


async def async_extra(sender: object, **kwargs: object) -> str:
    EVENTS.append(("async_extra", sender, kwargs))
    return "async extra"


RECEIVER_POOL = (sync_a, sync_c, sync_fails, sync_extra, async_b, async_d, async_fails, async_extra)


FLASK_APP = Flask(__name__)


def async_wrapper(receiver: Callable[..., Coroutine[t.Any, t.Any, t.Any]]) -> Callable[..., t.Any]:
    """Flask's own ``_async_wrapper`` (``app.ensure_sync``), logged."""
    EVENTS.append(("_async_wrapper", receiver.__name__))
    return FLASK_APP.ensure_sync(receiver)


def sync_wrapper(receiver: Callable[..., t.Any]) -> Callable[..., t.Any]:
    """A ``_sync_wrapper`` as blinker documents it: a coroutine function calling the receiver."""
    EVENTS.append(("_sync_wrapper", receiver.__name__))

    async def run(*args: t.Any, **kwargs: t.Any) -> t.Any:
        return receiver(*args, **kwargs)

    return run


MODES = ("send", "send with _async_wrapper", "send_async", "send_async with _sync_wrapper")

# Receivers each mode can call without blinker refusing (then with one raising),
# and the receiver a receivers_for override adds.
Receivers = tuple[Callable[..., t.Any], ...]
MODE_RECEIVERS: dict[str, tuple[Receivers, Receivers]] = {
    "send": ((sync_a, sync_c), (sync_a, sync_fails, sync_c)),
    "send with _async_wrapper": ((sync_a, async_b, sync_c), (sync_a, async_fails, sync_c)),
    "send_async": ((async_b, async_d), (async_b, async_fails, async_d)),
    "send_async with _sync_wrapper": ((sync_a, async_b), (sync_fails, async_b)),
}
MODE_EXTRA = {
    "send": sync_extra,
    "send with _async_wrapper": async_extra,
    "send_async": async_extra,
    "send_async with _sync_wrapper": sync_extra,
}


# --------------------------------------------------------------------------
# Traits: each adds overrides to the namespace of the subclass being built.
# The misbehaving properties misbehave only once the signal is "armed" (after
# its receivers are connected), so blinker's own connect() still works.


def _armed(signal: Signal) -> bool:
    return bool(signal.__dict__.get("armed"))


Namespace = dict[str, t.Any]
ClassCell = list[type[Signal]]  # holds the class once built, for super() in overrides


def inherited(cell: ClassCell, signal: Signal) -> Signal:
    """``super()`` for an override written outside the class body."""
    return t.cast(Signal, super(cell[0], signal))


def trait_hashing(ns: Namespace, variant: str, cell: ClassCell) -> None:
    if variant == "unhashable":  # defining __eq__ sets __hash__ to None

        def __eq__(self: Signal, other: object) -> bool:
            return type(other) is type(self) and self.__dict__.get("key") == other.__dict__.get(
                "key"
            )

        ns["__eq__"] = __eq__
    elif variant == "hash raises":

        def __hash__(self: Signal) -> int:
            raise SUBCLASS_ERROR

        ns["__hash__"] = __hash__
    elif variant == "eq raises":

        def eq_raises(self: Signal, other: object) -> bool:
            raise SUBCLASS_ERROR

        ns["__eq__"] = eq_raises
        ns["__hash__"] = object.__hash__
    else:  # pragma: no cover
        raise AssertionError(variant)


def trait_slots(ns: Namespace, variant: str, cell: ClassCell) -> None:
    # blinker's Signal has a __dict__ and __weakref__, so a subclass's __slots__
    # cannot take weak references away; it must still work exactly the same.
    ns["__slots__"] = ("key",)


def trait_repr(ns: Namespace, variant: str, cell: ClassCell) -> None:
    def __repr__(self: Signal) -> str:
        raise SUBCLASS_ERROR

    ns["__repr__"] = __repr__


def trait_name(ns: Namespace, variant: str, cell: ClassCell) -> None:
    def get(self: Signal) -> t.Any:
        if variant == "raises":
            raise SUBCLASS_ERROR
        return 42  # "not a string"

    def put(self: Signal, value: t.Any) -> None:
        self.__dict__["_name"] = value

    ns["name"] = property(get, put)


def trait_receivers(ns: Namespace, variant: str, cell: ClassCell) -> None:
    def get(self: Signal) -> t.Any:
        stored = self.__dict__["_receivers"]
        if not _armed(self):
            return stored
        if variant == "raises":
            raise SUBCLASS_ERROR
        if variant == "empty":
            return {}
        return list(stored.values())  # "list": truthy, but no .get()

    def put(self: Signal, value: t.Any) -> None:
        self.__dict__["_receivers"] = value

    ns["receivers"] = property(get, put)


def trait_is_muted(ns: Namespace, variant: str, cell: ClassCell) -> None:
    def get(self: Signal) -> bool:
        if not _armed(self):
            return bool(self.__dict__.get("_is_muted", False))
        EVENTS.append(("is_muted read",))
        if variant == "property raises":
            raise SUBCLASS_ERROR
        return variant == "property true"

    def put(self: Signal, value: bool) -> None:
        self.__dict__["_is_muted"] = value

    ns["is_muted"] = property(get, put)


def trait_receivers_for(ns: Namespace, variant: str, cell: ClassCell) -> None:
    def chosen(self: Signal, sender: t.Any) -> Iterator[Callable[..., t.Any]]:
        extras = self.__dict__["extras"]
        if variant == "own":  # never looks at self.receivers
            yield from extras
            return
        blinkers = inherited(cell, self).receivers_for(sender)
        if variant == "extra":
            yield from blinkers
            yield from extras
        elif variant == "reversed":
            yield from reversed(list(blinkers))
        elif variant == "filtered":
            yield from list(blinkers)[1:]
        else:  # pragma: no cover
            raise AssertionError(variant)

    def receivers_for(self: Signal, sender: t.Any) -> Iterator[Callable[..., t.Any]]:
        EVENTS.append(("receivers_for", sender))
        for receiver in chosen(self, sender):
            # Logged as yielded: blinker consumes the generator lazily, one
            # receiver at a time, and so must the traced send.
            EVENTS.append(("yields", receiver.__name__))
            yield receiver

    ns["receivers_for"] = receivers_for


def trait_has_receivers_for(ns: Namespace, variant: str, cell: ClassCell) -> None:
    def has_receivers_for(self: Signal, sender: t.Any) -> bool:
        EVENTS.append(("has_receivers_for", sender))
        if variant == "raises":
            raise SUBCLASS_ERROR
        return False

    ns["has_receivers_for"] = has_receivers_for


def trait_send(ns: Namespace, variant: str, cell: ClassCell) -> None:
    """The subclass's own send/send_async, calling blinker's through super()."""

    def send(
        self: Signal,
        sender: t.Any = None,
        /,
        *,
        _async_wrapper: t.Any = None,
        **kwargs: t.Any,
    ) -> t.Any:
        EVENTS.append(("own send", sender))
        return inherited(cell, self).send(
            sender, _async_wrapper=_async_wrapper, via="subclass", **kwargs
        )

    async def send_async(
        self: Signal,
        sender: t.Any = None,
        /,
        *,
        _sync_wrapper: t.Any = None,
        **kwargs: t.Any,
    ) -> t.Any:
        EVENTS.append(("own send_async", sender))
        return await inherited(cell, self).send_async(
            sender, _sync_wrapper=_sync_wrapper, via="subclass", **kwargs
        )

    ns["send"] = send
    ns["send_async"] = send_async


def trait_getattr(ns: Namespace, variant: str, cell: ClassCell) -> None:
    def __getattr__(self: Signal, name: str) -> t.Any:
        raise SUBCLASS_ERROR  # not AttributeError: getattr(signal, x, default) raises too

    ns["__getattr__"] = __getattr__


TRAITS: dict[str, tuple[Callable[[Namespace, str, ClassCell], None], tuple[str, ...]]] = {
    "hashing": (trait_hashing, ("unhashable", "hash raises", "eq raises")),
    "slots": (trait_slots, ("without __weakref__",)),
    "repr": (trait_repr, ("raises",)),
    "name": (trait_name, ("raises", "not a string")),
    "receivers": (trait_receivers, ("raises", "empty", "list")),
    "is_muted": (trait_is_muted, ("property false", "property true", "property raises")),
    "receivers_for": (trait_receivers_for, ("extra", "own", "reversed", "filtered")),
    "has_receivers_for": (trait_has_receivers_for, ("false", "raises")),
    "send": (trait_send, ("calls super().send",)),
    "getattr": (trait_getattr, ("raises for unknown attributes",)),
}


def build_class(base: type[Signal], traits: dict[str, str]) -> type[Signal]:
    ns: Namespace = {}
    cell: ClassCell = []
    for trait, variant in traits.items():
        TRAITS[trait][0](ns, variant, cell)
    name = "Sub_" + "_".join(f"{k}_{v}".replace(" ", "_") for k, v in traits.items())
    cls = type(name, (base,), ns)
    cell.append(cls)
    return cls


# --------------------------------------------------------------------------
# Running a send with and without sigtrace


class Case(t.NamedTuple):
    """One subclass, the receivers it gets and how it is sent to."""

    cls: type[Signal]
    traits: dict[str, str]
    mode: str
    receivers: tuple[Callable[..., t.Any], ...]
    extras: tuple[Callable[..., t.Any], ...]

    def build(self) -> Signal:
        signal = self.cls(SIGNAL_NAME) if issubclass(self.cls, NamedSignal) else self.cls()
        signal.__dict__["extras"] = self.extras
        for receiver in self.receivers:
            signal.connect(receiver, weak=False)
        signal.__dict__["armed"] = True
        return signal


Outcome = tuple[str, t.Any]  # ("returned", results) or ("raised", exception)


def send_once(signal: Signal, mode: str) -> Outcome:
    try:
        if mode == "send":
            results = signal.send("sender", k=1)
        elif mode == "send with _async_wrapper":
            results = signal.send("sender", _async_wrapper=async_wrapper, k=1)
        elif mode == "send_async":
            results = asyncio.run(signal.send_async("sender", k=1))
        else:
            results = asyncio.run(signal.send_async("sender", _sync_wrapper=sync_wrapper, k=1))
    except Exception as exc:
        return ("raised", exc)
    return ("returned", results)


class Run(t.NamedTuple):
    outcomes: list[Outcome]
    events: list[tuple[t.Any, ...]]
    sends: dict[str, float] | None  # sigtrace_signal_sends_total by signal label


def uninstrument_all() -> None:
    while sigtrace.is_instrumented():
        sigtrace.uninstrument()


INSTRUMENTATIONS = ("metrics", "metrics and spans")


def run(case: Case, instrumentation: str | None) -> Run:
    """Send ``SENDS`` times through a fresh signal, with sigtrace or without."""
    uninstrument_all()
    for error in (SUBCLASS_ERROR, SYNC_ERROR, ASYNC_ERROR):
        # Each raise of the shared instance adds to its traceback; span events
        # format it, so it must not grow over the file's thousands of sends.
        error.__traceback__ = error.__context__ = None
    signal = case.build()
    EVENTS.clear()
    if instrumentation is None:
        outcomes = [send_once(signal, case.mode) for _ in range(SENDS)]
        return Run(outcomes, list(EVENTS), None)
    registry = CollectorRegistry()
    provider = TracerProvider()
    options: dict[str, t.Any] = {}
    if instrumentation == "metrics and spans":  # every send takes the span path
        options = {"tracer_provider": provider, "root_spans": True}
    sigtrace.instrument(registry=registry, **options)
    try:
        outcomes = [send_once(signal, case.mode) for _ in range(SENDS)]
    finally:
        uninstrument_all()
        provider.shutdown()
    return Run(outcomes, list(EVENTS), sends_by_label(registry))


def sends_by_label(registry: CollectorRegistry) -> dict[str, float]:
    """Scrape ``registry``: ``sigtrace_signal_sends_total`` by signal label (non-zero)."""
    text = generate_latest(registry).decode("utf-8")
    # Only the sends family is parsed: the histograms' many lines would make
    # the parser most of this file's run time.
    wanted = "\n".join(
        line for line in text.splitlines() if "sigtrace_signal_sends_total" in line.split(" {")[0]
    )
    return {
        sample.labels["signal"]: sample.value
        for family in text_string_to_metric_families(wanted)
        for sample in family.samples
        if sample.name == "sigtrace_signal_sends_total" and sample.value
    }


def describe(outcome: Outcome) -> str:
    kind, value = outcome
    if kind == "raised":
        return f"raised {type(value).__name__}({', '.join(map(str, value.args))})"
    return "returned " + repr([(getattr(r, "__name__", r), v) for r, v in value])


def assert_same_outcome(bare: Outcome, traced: Outcome, where: str) -> None:
    message = f"{where}: without sigtrace the send {describe(bare)}, with it {describe(traced)}"
    assert bare[0] == traced[0], message
    if bare[0] == "returned":
        assert len(traced[1]) == len(bare[1]), message
        for (receiver, value), (got_receiver, got_value) in zip(bare[1], traced[1], strict=True):
            assert got_receiver is receiver and got_value == value, message
    elif isinstance(bare[1], OWN_ERRORS):  # raised by a receiver or the subclass
        assert traced[1] is bare[1], message + " (not the same exception object)"
    else:  # blinker's own error (RuntimeError, AttributeError, ...)
        assert type(traced[1]) is type(bare[1]) and traced[1].args == bare[1].args, message


def expected_sends(case: Case) -> int | None:
    """How many sends sigtrace must count: the unmuted ones (None: not decidable)."""
    muted = case.traits.get("is_muted")
    if muted == "property raises":
        return None  # blinker raises from is_muted itself; counting it is left open
    return 0 if muted == "property true" else SENDS


def expected_label(case: Case) -> str | None:
    """The label the sends must carry; None: any (fallback) label."""
    if issubclass(case.cls, NamedSignal) and "name" not in case.traits:
        return SIGNAL_NAME
    return None


def assert_like_blinker(case: Case, instrumentations: t.Iterable[str] = INSTRUMENTATIONS) -> None:
    bare = run(case, None)
    for instrumentation in instrumentations:
        traced = run(case, instrumentation)
        where = f"{case.cls.__name__} via {case.mode} ({instrumentation})"
        for number, (b, s) in enumerate(zip(bare.outcomes, traced.outcomes, strict=True), 1):
            assert_same_outcome(b, s, f"{where}, send {number}")
        assert traced.events == bare.events, (
            f"{where}: the app saw other calls with sigtrace\n"
            f"  without: {bare.events}\n  with:    {traced.events}"
        )
        expected = expected_sends(case)
        assert traced.sends is not None
        if expected is None:
            continue
        total = sum(traced.sends.values())
        assert total == expected, (
            f"{where}: sigtrace_signal_sends_total counted {traced.sends}, expected {expected} "
            "send(s) in all (a signal that cannot be tracked is counted under a fallback name)"
        )
        label = expected_label(case)
        if label is not None and expected:
            assert traced.sends == {label: float(expected)}, (where, traced.sends)


# --------------------------------------------------------------------------
# One trait at a time


# NamedSignal: the sends must be counted under its name (unless "name" is the
# trait); plain Signal for the hashing traits of the report (the property test
# below mixes both bases with every trait).
ONE_TRAIT = [
    (base, trait, variant)
    for trait, (_, variants) in TRAITS.items()
    for variant in variants
    for base in ((Signal, NamedSignal) if trait == "hashing" else (NamedSignal,))
]


@pytest.mark.parametrize(
    ("base", "trait", "variant"),
    ONE_TRAIT,
    ids=[f"{b.__name__}-{t_}-{v}".replace(" ", "_") for b, t_, v in ONE_TRAIT],
)
@pytest.mark.parametrize("failing", [False, True], ids=["ok", "a receiver raises"])
@pytest.mark.parametrize("mode", MODES)
def test_a_subclass_with_one_trait_behaves_as_without_sigtrace(
    base: type[Signal], trait: str, variant: str, failing: bool, mode: str
) -> None:
    cls = build_class(base, {trait: variant})
    receivers = MODE_RECEIVERS[mode][failing]
    assert_like_blinker(Case(cls, {trait: variant}, mode, receivers, (MODE_EXTRA[mode],)))


@pytest.mark.parametrize("variant", TRAITS["receivers_for"][1])
@pytest.mark.parametrize("mode", MODES)
def test_receivers_for_override_is_honoured_with_nothing_connected(variant: str, mode: str) -> None:
    """Issue 12: receivers that only an override yields, ``self.receivers`` empty."""
    traits = {"receivers_for": variant}
    assert_like_blinker(Case(build_class(Signal, traits), traits, mode, (), (MODE_EXTRA[mode],)))


def test_the_unhashable_keyed_signal_of_the_report() -> None:
    class KeyedSignal(Signal):
        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

        def __eq__(self, other: object) -> bool:
            return isinstance(other, KeyedSignal) and other.key == self.key

    def receiver(sender: object, **kwargs: object) -> str:
        return "called"

    uninstrument_all()
    signal = KeyedSignal("k")
    signal.connect(receiver)
    assert signal.send("s") == [(receiver, "called")]
    registry = CollectorRegistry()
    sigtrace.instrument(registry=registry)
    try:
        assert signal.send("s") == [(receiver, "called")]
    finally:
        uninstrument_all()
    assert sum(sends_by_label(registry).values()) == 1


def test_the_receivers_for_override_of_the_report() -> None:
    def extra(sender: object, **kwargs: object) -> str:
        return "extra"

    class Custom(Signal):
        def receivers_for(self, sender: t.Any) -> Generator[Callable[..., t.Any], None, None]:
            yield from super().receivers_for(sender)
            yield extra

    uninstrument_all()
    signal = Custom()
    assert signal.send("s") == [(extra, "extra")]
    registry = CollectorRegistry()
    sigtrace.instrument(registry=registry)
    try:
        assert signal.send("s") == [(extra, "extra")]
        assert asyncio.run(signal.send_async("s", _sync_wrapper=sync_wrapper)) == [(extra, "extra")]
    finally:
        uninstrument_all()
    assert sum(sends_by_label(registry).values()) == 2


def test_a_muted_subclass_is_not_counted_and_calls_nothing() -> None:
    """The control for the counting rule: ``muted()`` on a subclass."""
    traits = {"receivers_for": "extra"}
    case = Case(build_class(NamedSignal, traits), traits, "send", (sync_a,), (sync_extra,))
    uninstrument_all()
    registry = CollectorRegistry()
    sigtrace.instrument(registry=registry)
    try:
        signal = case.build()
        EVENTS.clear()
        with signal.muted():
            assert signal.send("sender") == []
        assert signal.send("sender") == [(sync_a, "a"), (sync_extra, "extra")]
    finally:
        uninstrument_all()
    assert [e[0] for e in EVENTS] == ["receivers_for", "yields", "sync_a", "yields", "sync_extra"]
    assert sends_by_label(registry) == {SIGNAL_NAME: 1.0}


# --------------------------------------------------------------------------
# Traits in combination (hypothesis)


PROPERTY = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

trait_choices = st.fixed_dictionaries(
    {},
    optional={trait: st.sampled_from(variants) for trait, (_, variants) in TRAITS.items()},
)


@PROPERTY
@given(
    traits=trait_choices,
    base=st.sampled_from([Signal, NamedSignal]),
    mode=st.sampled_from(MODES),
    receivers=st.lists(st.sampled_from(RECEIVER_POOL), unique=True, max_size=4),
    extras=st.lists(st.sampled_from(RECEIVER_POOL), unique=True, max_size=2),
    instrumentation=st.sampled_from(INSTRUMENTATIONS),
)
def test_any_combination_of_traits_behaves_as_without_sigtrace(
    traits: dict[str, str],
    base: type[Signal],
    mode: str,
    receivers: list[Callable[..., t.Any]],
    extras: list[Callable[..., t.Any]],
    instrumentation: str,
) -> None:
    case = Case(build_class(base, traits), traits, mode, tuple(receivers), tuple(extras))
    assert_like_blinker(case, (instrumentation,))
