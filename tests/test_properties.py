"""Property-based: whatever the names, receivers, kwargs and settings, sigtrace
never raises (only receivers' own exceptions propagate), its exposition always
parses, its span attributes always encode, and every bad setting is a
``ConfigError`` that names its key.
"""

from __future__ import annotations

import asyncio
import functools
import math
import subprocess
import typing as t
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
from blinker import NamedSignal, Signal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

import sigtrace
from sigtrace import ConfigError, dispatch
from sigtrace.config import KEYS, Settings, load_settings
from tests.conftest import require_tool

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Any text, control characters included; lone surrogates are added on purpose
# (Python strings hold them although no encoder accepts them).
any_text = st.text(
    st.characters(codec=None, categories=("L", "M", "N", "P", "S", "Z", "C")), max_size=300
)
with_surrogate = st.builds(
    lambda head, surrogate, tail: head + surrogate + tail,
    any_text,
    st.characters(categories=["Cs"]),
    any_text,
)
huge_text = st.builds(
    lambda piece, times: piece * times, st.text(min_size=1, max_size=8), st.integers(500, 5000)
)
names = st.one_of(
    any_text, with_surrogate, huge_text, st.sampled_from(["", " ", "\x00", "\n", '"\\', "}"])
)


@contextmanager
def instrumented(**options: t.Any) -> Iterator[tuple[CollectorRegistry, InMemorySpanExporter]]:
    """A fresh registry and in-memory span exporter, instrumented for one example."""
    while dispatch.is_instrumented():
        dispatch.uninstrument()
    registry = CollectorRegistry()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sigtrace.instrument(registry=registry, tracer_provider=provider, **options)
    try:
        with provider.get_tracer("properties").start_as_current_span("example"):
            yield registry, exporter
    finally:
        while dispatch.is_instrumented():
            dispatch.uninstrument()
        provider.shutdown()


def assert_exposition_valid(registry: CollectorRegistry) -> dict[str, list[t.Any]]:
    """Both formats parse; returns the text format's samples by family name."""
    text = generate_latest(registry).decode("utf-8")
    families = {f.name: list(f.samples) for f in text_string_to_metric_families(text)}
    openmetrics = generate_openmetrics(registry).decode("utf-8")
    assert {f.name for f in parse_openmetrics(openmetrics)} == set(families) - {""}
    return families


def assert_spans_encode(exporter: InMemorySpanExporter) -> None:
    """Every attribute is one OTLP can carry, so the exporter drops none of them."""
    spans = exporter.get_finished_spans()
    for span in spans:
        for key, value in (span.attributes or {}).items():
            for text in (key, value) if isinstance(value, str) else (key,):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    pytest.fail(
                        f"span attribute {key!r}={value!r} is not valid UTF-8: the exporter "
                        "drops it and logs a traceback for every such span"
                    )
            if isinstance(value, int) and not isinstance(value, bool):
                assert -(2**63) <= value < 2**63, (
                    f"span attribute {key}={value} does not fit OTLP's int64: the exporter "
                    "drops it and logs a traceback for every such span"
                )
    try:
        encode_spans(spans).SerializeToString()
    except Exception as exc:  # pragma: no cover - reported as the failure
        pytest.fail(f"spans do not encode as OTLP: {exc!r}")


# --------------------------------------------------------------------------
# Signal names


@PROPERTY
@given(name=names)
def test_any_signal_name_sends_and_exposes_validly(name: str) -> None:
    with instrumented() as (registry, exporter):
        signal = NamedSignal(name)
        calls: list[object] = []
        signal.connect(calls.append, weak=False)
        assert [v for _, v in signal.send("sender")] == [None]
        assert calls == ["sender"]
        families = assert_exposition_valid(registry)
        labels = [s.labels["signal"] for s in families["sigtrace_signal_sends"]]
    assert len(labels) == 1 and labels[0], labels
    assert len(labels[0]) <= 200 and labels[0].isprintable(), labels[0]
    assert_spans_encode(exporter)


@PROPERTY
@given(name=names)
def test_any_signal_name_is_a_valid_span_name_and_attribute(name: str) -> None:
    with instrumented() as (_, exporter):
        signal = NamedSignal(name)
        signal.connect(lambda sender: None, weak=False)
        signal.send(None)
    signal_spans = [s for s in exporter.get_finished_spans() if s.name.startswith("signal ")]
    assert len(signal_spans) == 1
    assert signal_spans[0].name.encode("utf-8")
    assert_spans_encode(exporter)


# --------------------------------------------------------------------------
# Receivers of every callable kind


def plain(sender: object, **kwargs: object) -> str:
    return "plain"


def tagged(tag: str, sender: object, **kwargs: object) -> str:
    return tag


class Receivers:
    def method(self, sender: object, **kwargs: object) -> str:
        return "method"

    @classmethod
    def class_method(cls, sender: object, **kwargs: object) -> str:
        return "class"

    @staticmethod
    def static_method(sender: object, **kwargs: object) -> str:
        return "static"

    def __call__(self, sender: object, **kwargs: object) -> str:
        return "call"


class Event:
    """A class used as a receiver: calling it builds an event."""

    def __init__(self, sender: object, **kwargs: object) -> None:
        self.sender = sender


@functools.cache  # a C-implemented callable wrapper
def cached(sender: object) -> str:
    return "cached"


def decorated(function: Callable[..., t.Any]) -> Callable[..., t.Any]:
    @functools.wraps(function)
    def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        return function(*args, **kwargs)

    return wrapper


# Each factory: (make a receiver, accepts arbitrary kwargs).
RECEIVER_FACTORIES: dict[str, tuple[Callable[[], t.Any], bool]] = {
    "function": (lambda: plain, True),
    "lambda": (lambda: lambda sender, **kwargs: "lambda", True),
    "bound method": (lambda: Receivers().method, True),
    "classmethod": (lambda: Receivers.class_method, True),
    "staticmethod": (lambda: Receivers.static_method, True),
    "partial": (lambda: functools.partial(tagged, "partial"), True),
    "nested partial": (
        lambda: functools.partial(functools.partial(functools.partial(tagged), "nested")),
        True,
    ),
    "deep partial": (
        lambda: functools.reduce(lambda f, _: functools.partial(f), range(20), plain),
        True,
    ),
    "callable object": (lambda: Receivers(), True),
    "class": (lambda: Event, True),
    "decorated": (lambda: decorated(plain), True),
    "builtin function": (lambda: repr, False),
    "builtin method": (lambda: [].append, False),
    "functools.cache wrapper": (lambda: cached, False),
    "Mock": (lambda: mock.Mock(), True),
    "MagicMock": (lambda: mock.MagicMock(), True),
    "Mock with spec": (lambda: mock.Mock(spec=plain), True),
    "autospec of a callable object": (lambda: mock.create_autospec(Receivers()), True),
}

kwarg_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**200),
    st.integers(min_value=-(2**200), max_value=-(2**63) + 2),
    st.floats(),
    any_text,
    with_surrogate,
    huge_text,
    st.binary(max_size=50),
    st.lists(st.integers(), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.builds(object),
    st.just(mock.MagicMock()),
)
kwarg_names = st.text(min_size=1, max_size=20).filter(lambda k: k != "_async_wrapper")
kwargs_strategy = st.dictionaries(kwarg_names, kwarg_values, max_size=5)


@PROPERTY
@given(
    kinds=st.lists(st.sampled_from(sorted(RECEIVER_FACTORIES)), min_size=1, max_size=6),
    kwargs=kwargs_strategy,
    name=names,
    record=st.booleans(),
)
def test_any_receivers_and_kwargs_never_make_sigtrace_raise(
    kinds: list[str], kwargs: dict[str, t.Any], name: str, record: bool
) -> None:
    if not all(RECEIVER_FACTORIES[kind][1] for kind in kinds):
        kwargs = {}  # builtins take the sender only
    expected = blinker_outcome(kinds, kwargs)
    receivers = [RECEIVER_FACTORIES[kind][0]() for kind in kinds]
    record_kwargs = tuple(kwargs) if record else ()
    with instrumented(record_kwargs=record_kwargs) as (registry, exporter):
        signal = NamedSignal(name)
        for receiver in receivers:
            signal.connect(receiver, weak=False)
        try:
            results = signal.send("sender", **kwargs)
            got = "returned"
        except Exception as exc:
            got = f"raised {type(exc).__name__}"
        connected = list(signal.receivers_for("sender"))
        families = assert_exposition_valid(registry)
    assert got == expected, (
        f"receivers {kinds}: blinker alone {expected}, with sigtrace the send {got}"
    )
    assert_spans_encode(exporter)
    if got != "returned":
        return
    assert [r for r, _ in results] == connected, "results must hold the original receivers"
    assert all(any(r is c for c in connected) for r, _ in results)
    for receiver in receivers:
        if isinstance(receiver, mock.Mock):
            receiver.assert_called_with("sender", **kwargs)
    names_seen = {s.labels["receiver"] for s in families["sigtrace_receiver_duration_seconds"]}
    assert len(names_seen) <= len(connected)
    assert all(n and "0x" not in n and n.isprintable() for n in names_seen), names_seen
    counts = sum(
        s.value for s in families["sigtrace_receiver_duration_seconds"] if s.name.endswith("_count")
    )
    assert counts == len(connected)


def blinker_outcome(kinds: list[str], kwargs: dict[str, t.Any]) -> str:
    """What blinker alone does when sending to fresh receivers of these kinds."""
    while dispatch.is_instrumented():
        dispatch.uninstrument()
    signal = Signal()
    for kind in kinds:
        signal.connect(RECEIVER_FACTORIES[kind][0](), weak=False)
    try:
        signal.send("sender", **kwargs)
    except Exception as exc:  # e.g. Mock(spec=function): blinker's own check raises
        return f"raised {type(exc).__name__}"
    return "returned"


class ReceiverError(Exception):
    pass


@PROPERTY
@given(kinds=st.lists(st.sampled_from(["function", "Mock", "partial"]), max_size=3),
       kwargs=kwargs_strategy, position=st.integers(0, 3))  # fmt: skip
def test_only_the_receivers_own_exception_propagates(
    kinds: list[str], kwargs: dict[str, t.Any], position: int
) -> None:
    error = ReceiverError("the receiver's own")
    failing = mock.Mock(side_effect=error)
    receivers = [RECEIVER_FACTORIES[kind][0]() for kind in kinds]
    receivers.insert(min(position, len(receivers)), failing)
    with instrumented(record_kwargs=tuple(kwargs)) as (registry, exporter):
        signal = Signal()
        for receiver in receivers:
            signal.connect(receiver, weak=False)
        with pytest.raises(ReceiverError) as raised:
            signal.send("sender", **kwargs)
        families = assert_exposition_valid(registry)
    assert raised.value is error
    errors = [s for s in families["sigtrace_receiver_errors"] if s.name.endswith("_total")]
    assert [s.value for s in errors] == [1.0] and errors[0].labels["exception"] == "ReceiverError"
    assert_spans_encode(exporter)


@PROPERTY
@given(kwargs=kwargs_strategy, name=names, count=st.integers(1, 4))
def test_any_async_receivers_and_kwargs_never_make_sigtrace_raise(
    kwargs: dict[str, t.Any], name: str, count: int
) -> None:
    async def receiver(sender: object, **kwargs: object) -> str:
        await asyncio.sleep(0)
        return "async"

    async_mock = mock.AsyncMock(return_value="mock")
    with instrumented(record_kwargs=tuple(kwargs)) as (registry, exporter):
        signal = NamedSignal(name)
        signal.connect(receiver, weak=False)
        signal.connect(async_mock, weak=False)
        for _ in range(count):
            results = asyncio.run(signal.send_async("sender", **kwargs))
            assert sorted(v for _, v in results) == ["async", "mock"]
        families = assert_exposition_valid(registry)
    counts = [s.value for s in families["sigtrace_signal_sends"] if s.name.endswith("_total")]
    assert counts == [float(count)]
    assert async_mock.await_count == count
    assert_spans_encode(exporter)


ODD_NAMES = [
    "",
    " ",
    "a\nb",
    'quote"backslash\\brace}',
    "tab\there",
    "\x00\x01\x7f",
    "\ud800lone surrogate",
    "émoji 🎉 ünïcödé",
    "\u2028line separator",
    "x" * 5000,
    "# HELP not_a_comment",
    "le",
    "__name__",
]


def test_promtool_accepts_an_exposition_full_of_odd_names(registry: CollectorRegistry) -> None:
    promtool = require_tool("promtool")
    sigtrace.instrument(registry=registry)
    kept: list[t.Any] = []
    for name in ODD_NAMES:
        signal = NamedSignal(name)

        def receiver(sender: object, **kwargs: object) -> None:
            if sender == "fail":
                raise ValueError(sender)

        receiver.__qualname__ = name or "empty"
        signal.connect(receiver, weak=False)
        signal.connect(mock.MagicMock(), weak=False)
        signal.send("ok")
        with pytest.raises(ValueError):
            signal.send("fail")
        kept.append(signal)
    text = generate_latest(registry)
    parsed = {f.name for f in text_string_to_metric_families(text.decode("utf-8"))}
    assert "sigtrace_receiver_errors" in parsed
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode("utf-8", "replace")


# --------------------------------------------------------------------------
# Config: every bad value is a ConfigError naming its key


def expected_types(key: str) -> tuple[type, ...]:
    """Types a valid value of ``key`` parses to (from the Settings default)."""
    default = getattr(Settings(), key.removeprefix("SIGTRACE_").lower())
    if default is None:
        return (str, int, type(None))
    return (type(default),)


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**64),
    st.floats(),
    st.just(math.inf),
    st.just(-math.inf),
    st.text(),
    st.binary(max_size=10),
    st.lists(st.one_of(st.integers(), st.floats(), st.text(), st.none()), max_size=4),
    st.tuples(st.floats(), st.floats()),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sets(st.text(max_size=3), max_size=3),
    st.builds(object),
)


def check_setting(key: str, value: object, source: str) -> None:
    config, environ = ({key: value}, {}) if source == "config" else ({}, {key: value})
    try:
        loaded = load_settings(config, environ=t.cast(t.Mapping[str, str], environ))
    except ConfigError as error:
        assert key in str(error), f"ConfigError for {key} does not name it: {error}"
        return
    except Exception as error:
        pytest.fail(
            f"{key}={value!r} (from {source}) raised {type(error).__name__}: {error}; "
            "a bad setting must raise ConfigError naming the key"
        )
    parsed = getattr(loaded, key.removeprefix("SIGTRACE_").lower())
    assert isinstance(parsed, expected_types(key)), (key, value, parsed)


@PROPERTY
@given(key=st.sampled_from(sorted(KEYS)), value=junk)
def test_any_value_in_app_config_is_accepted_or_a_config_error_naming_the_key(
    key: str, value: object
) -> None:
    check_setting(key, value, "config")


@PROPERTY
@given(key=st.sampled_from(sorted(KEYS)), value=st.text())
def test_any_environment_value_is_accepted_or_a_config_error_naming_the_key(
    key: str, value: str
) -> None:
    check_setting(key, value, "environment")


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr")

    __str__ = __repr__


BAD_VALUES: dict[str, list[object]] = {
    "SIGTRACE_METRICS": ["maybe", 2, None, [], ""],
    "SIGTRACE_TRACING": ["nope", 1.5, {}],
    "SIGTRACE_METRICS_PATH": ["metrics", 5, None, ["/metrics"]],
    "SIGTRACE_METRICS_PORT": [-1, 65536, "http", 1.5, True, math.inf, math.nan, []],
    "SIGTRACE_METRICS_ADDR": ["", "   ", 127, None],
    "SIGTRACE_METRICS_TOKEN": ["   ", 1234, ["t"]],
    "SIGTRACE_SPANS": ["some", "", 1, None],
    "SIGTRACE_ROOT_SPANS": ["sometimes", 0.5],
    "SIGTRACE_INCLUDE_SIGNALS": [5, [1, 2], {"a": 1}, None],
    "SIGTRACE_EXCLUDE_SIGNALS": [5.0, [None], b"x"],
    "SIGTRACE_EXCLUDED_PATHS": [True, [b"/x"]],
    "SIGTRACE_RECORD_KWARGS": [1, [["plan"]]],
    "SIGTRACE_BUCKETS": [
        [],
        [0.1, 0.05],
        [-1, 1],
        [0, 1],
        [math.inf],
        [math.nan],
        ["a"],
        "0.1,x",
        0.1,
        [True, 2],
        [1e400],
        [10**400],
    ],
    "SIGTRACE_MAX_LABEL_VALUES": [0, -5, 1.5, "ten", True, math.inf, math.nan, None],
    "SIGTRACE_OTLP_ENDPOINT": ["   ", 4317, ["http://x"]],
    "SIGTRACE_CONSOLE_SPANS": ["loud", 3],
    "SIGTRACE_PUBLISH_INTERVAL": [0, -1, "soon", True, math.inf, math.nan, None, [1]],
    "SIGTRACE_SLOW_THRESHOLD": [0, -0.001, 3601, "fast", True, math.inf, math.nan, None, [1]],
}


def test_every_key_has_explicit_bad_values() -> None:
    assert set(BAD_VALUES) == set(KEYS), "a new key needs its bad values here"


@pytest.mark.parametrize(
    ("key", "value"),
    [(key, value) for key, values in BAD_VALUES.items() for value in values],
    ids=lambda v: v if isinstance(v, str) and v.startswith("SIGTRACE_") else repr(v)[:24],
)
def test_explicit_bad_values_raise_config_error_naming_the_key(key: str, value: object) -> None:
    try:
        load_settings({key: value}, environ={})
    except ConfigError as error:
        assert key in str(error)
    except Exception as error:
        pytest.fail(f"{key}: {type(error).__name__}: {error}; expected ConfigError naming {key}")
    else:
        pytest.fail(f"{key}={value!r} was accepted")


def test_a_bad_value_whose_repr_raises_is_still_a_config_error() -> None:
    failures = []
    for key in sorted(KEYS):
        try:
            load_settings({key: BadRepr()}, environ={})
        except ConfigError as error:
            if key not in str(error):
                failures.append(f"{key}: {error}")
        except Exception as error:
            failures.append(f"{key}: {type(error).__name__}: {error}")
        else:
            failures.append(f"{key}: accepted")
    assert not failures, (
        "a value whose repr() raises must still give a ConfigError naming the key: "
        + "; ".join(failures)
    )


def test_non_string_keys_in_app_config_are_ignored() -> None:
    # Flask configs are plain dicts; other extensions may use any hashable key.
    try:
        settings_ = load_settings({1: "one", ("a",): "b", None: 0}, environ={})  # type: ignore[dict-item]
    except Exception as error:
        pytest.fail(
            f"a non-string app.config key made sigtrace raise {type(error).__name__}: {error}"
        )
    assert settings_ == Settings()
