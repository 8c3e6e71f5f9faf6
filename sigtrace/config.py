"""Settings from ``app.config`` and the environment, validated once at init_app.

Each key is read from ``app.config`` first, then from an environment variable
of the same name, then its default. A wrong type or value raises
:class:`ConfigError` naming the key, the value and what is expected; an
unknown ``SIGTRACE_*`` key (a typo) raises too.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import re
import typing as t
import urllib.parse
from collections.abc import Callable, Mapping

from .metrics import DEFAULT_BUCKETS, DEFAULT_MAX_LABEL_VALUES
from .options import MAX_SLOW_THRESHOLD, Options
from .tracing import SPAN_MODES, SpanMode

__all__ = ["ConfigError", "KEYS", "Settings", "load_settings"]


class ConfigError(ValueError):
    """A sigtrace setting has a wrong type or value, or an unknown key was given."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise TypeError("a boolean (true/false, 1/0, yes/no, on/off)")


# RFC 3986 path characters (pchar and "/") that need no escaping: no whitespace,
# no "<>" (a Flask rule would read them as a URL variable), no "?#", and no "%"
# (Flask matches rules against the decoded path, so an escape would never match).
_URL_PATH = re.compile(r"(?:/[A-Za-z0-9\-._~!$&'()*+,;=:@]*)+")


def _path(value: object) -> str:
    if not isinstance(value, str) or (value and not _URL_PATH.fullmatch(value)):
        raise TypeError(
            "a URL path starting with '/' made of unescaped RFC 3986 path characters "
            "(no spaces, '%', '<', '>', '?' or '#'), or '' to disable the route"
        )
    return value


def _port(value: object) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise TypeError("a TCP port number from 0 to 65535")
    try:
        port = int(t.cast(t.Any, value))
    except (TypeError, ValueError, OverflowError):
        raise TypeError("a TCP port number from 0 to 65535") from None
    if not 0 <= port <= 65535 or (isinstance(value, float) and value != port):
        raise TypeError("a TCP port number from 0 to 65535")
    return port


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TypeError("a non-empty string")
    return value.strip()


def _token(value: object) -> str | None:
    # Unset (None, or no key at all) is no token; an empty or blank string is what an
    # unset secret variable of a deploy gives, and would silently open the route.
    # Surrounding whitespace (a secret file's newline) is stripped, as before.
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise TypeError("a non-empty token (or leave the key unset for no token)")
    token = value.strip()
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        raise TypeError("a token of printable characters without whitespace")
    return token


def _endpoint(value: object) -> str | None:
    expected = (
        "an absolute http:// or https:// URL with a host, e.g. http://localhost:4317 "
        "(or leave it unset)"
    )
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TypeError(expected)
    try:
        url = urllib.parse.urlsplit(value.strip())
        url.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise TypeError(expected) from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise TypeError(expected)
    return value.strip()


def _names(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    else:
        raise TypeError("a comma-separated string or a list of strings")
    if not all(isinstance(item, str) for item in items):
        raise TypeError("a comma-separated string or a list of strings")
    return tuple(item for item in items if item)


def _buckets(value: object) -> tuple[float, ...]:
    expected = "a non-empty increasing list of positive finite numbers (seconds)"
    raw: list[object]
    if isinstance(value, str):
        raw = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        raw = list(value)
    else:
        raise TypeError(expected)
    try:
        bounds = [float(t.cast(t.Any, item)) for item in raw if not isinstance(item, bool)]
    except (TypeError, ValueError, OverflowError):
        raise TypeError(expected) from None
    if (
        not bounds
        or len(bounds) != len(raw)
        or any(not math.isfinite(b) or b <= 0 for b in bounds)
        or any(b >= c for b, c in itertools.pairwise(bounds))
    ):
        raise TypeError(expected)
    return tuple(bounds)


def _positive_int(value: object) -> int:
    if isinstance(value, bool):
        raise TypeError("a whole number of at least 1")
    try:
        number = int(t.cast(t.Any, value))
    except (TypeError, ValueError, OverflowError):
        raise TypeError("a whole number of at least 1") from None
    if number < 1 or (isinstance(value, float) and value != number):
        raise TypeError("a whole number of at least 1")
    return number


def _positive_seconds(value: object) -> float:
    expected = "a positive finite number of seconds"
    if isinstance(value, bool):
        raise TypeError(expected)
    try:
        seconds = float(t.cast(t.Any, value))
    except (TypeError, ValueError, OverflowError):
        raise TypeError(expected) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise TypeError(expected)
    return seconds


def _slow_threshold(value: object) -> float:
    seconds = _positive_seconds(value)
    if seconds > MAX_SLOW_THRESHOLD:
        raise TypeError(f"a positive number of seconds up to {MAX_SLOW_THRESHOLD:g}")
    return seconds


def _span_mode(value: object) -> str:
    if not isinstance(value, str) or value.strip().lower() not in SPAN_MODES:
        raise TypeError("one of " + ", ".join(repr(m) for m in SPAN_MODES))
    return value.strip().lower()


class _Key(t.NamedTuple):
    parse: Callable[[object], t.Any]
    default: object
    doc: str


KEYS: dict[str, _Key] = {
    "SIGTRACE_METRICS": _Key(_bool, True, "record Prometheus metrics"),
    "SIGTRACE_TRACING": _Key(_bool, True, "make OpenTelemetry spans"),
    "SIGTRACE_METRICS_PATH": _Key(_path, "/metrics", "route serving metrics; '' disables it"),
    "SIGTRACE_METRICS_PORT": _Key(_port, None, "port of a separate exposition server"),
    "SIGTRACE_METRICS_ADDR": _Key(_text, "127.0.0.1", "address that server binds"),
    "SIGTRACE_METRICS_TOKEN": _Key(_token, None, "bearer token the route and server require"),
    "SIGTRACE_SPANS": _Key(_span_mode, "all", "which spans: all, signals, receivers, slow, none"),
    "SIGTRACE_SLOW_THRESHOLD": _Key(
        _slow_threshold, 0.001, "seconds a send or receiver takes for its span under slow"
    ),
    "SIGTRACE_ROOT_SPANS": _Key(_bool, False, "make signal spans outside any span"),
    "SIGTRACE_INCLUDE_SIGNALS": _Key(_names, (), "only these signal name patterns"),
    "SIGTRACE_EXCLUDE_SIGNALS": _Key(_names, (), "never these signal name patterns"),
    "SIGTRACE_EXCLUDED_PATHS": _Key(_names, (), "request path patterns not timed"),
    "SIGTRACE_RECORD_KWARGS": _Key(_names, (), "signal kwargs keys recorded on spans"),
    "SIGTRACE_BUCKETS": _Key(_buckets, DEFAULT_BUCKETS, "histogram bucket bounds, seconds"),
    "SIGTRACE_MAX_LABEL_VALUES": _Key(
        _positive_int, DEFAULT_MAX_LABEL_VALUES, "distinct values per label"
    ),
    "SIGTRACE_OTLP_ENDPOINT": _Key(_endpoint, None, "OTLP endpoint (else OTEL_*)"),
    "SIGTRACE_CONSOLE_SPANS": _Key(_bool, False, "print spans when no endpoint is set"),
    "SIGTRACE_PUBLISH_INTERVAL": _Key(
        _positive_seconds, 1.0, "seconds between a worker's metric publishes (multiprocess)"
    ),
}


_SECRET_KEYS = frozenset({"SIGTRACE_METRICS_TOKEN"})  # never echoed in errors


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated settings of one app."""

    metrics: bool = True
    tracing: bool = True
    metrics_path: str = "/metrics"
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    metrics_token: str | None = None
    spans: str = "all"
    slow_threshold: float = 0.001
    root_spans: bool = False
    include_signals: tuple[str, ...] = ()
    exclude_signals: tuple[str, ...] = ()
    excluded_paths: tuple[str, ...] = ()
    record_kwargs: tuple[str, ...] = ()
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    max_label_values: int = DEFAULT_MAX_LABEL_VALUES
    otlp_endpoint: str | None = None
    console_spans: bool = False
    publish_interval: float = 1.0

    def instrument_options(self, registry: t.Any, tracer_provider: t.Any) -> Options:
        """The process-wide instrumentation these settings ask for."""
        return Options(
            registry=registry,
            tracer_provider=tracer_provider,
            metrics=self.metrics,
            tracing_enabled=self.tracing,
            spans=t.cast(SpanMode, self.spans),
            slow_threshold=self.slow_threshold,
            root_spans=self.root_spans,
            include=self.include_signals,
            exclude=self.exclude_signals,
            record_kwargs=frozenset(self.record_kwargs),
            buckets=self.buckets,
            max_label_values=self.max_label_values,
        )


def _shown(value: object) -> str:
    """``repr(value)`` for an error message: bounded, and never raising."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 200 else text[:200] + "..."


def load_settings(
    config: Mapping[str, t.Any], environ: Mapping[str, str] | None = None
) -> Settings:
    """Read and validate every sigtrace key; raise :class:`ConfigError` on the first bad one."""
    environ = os.environ if environ is None else environ
    for source, where in ((config, "app.config"), (environ, "the environment")):
        for key in source:
            if isinstance(key, str) and key.startswith("SIGTRACE_") and key not in KEYS:
                close = difflib.get_close_matches(key, KEYS, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(
                    f"unknown sigtrace setting {key} in {where}{hint} "
                    f"(known: {', '.join(sorted(KEYS))})"
                )
    values: dict[str, t.Any] = {}
    for key, spec in KEYS.items():
        if key in config:
            raw, where = config[key], "app.config"
        elif key in environ:
            raw, where = environ[key], "the environment"
        else:
            values[key.removeprefix("SIGTRACE_").lower()] = spec.default
            continue
        try:
            values[key.removeprefix("SIGTRACE_").lower()] = spec.parse(raw)
        except TypeError as expected:
            raise ConfigError(
                f"{key}={'<redacted>' if key in _SECRET_KEYS else _shown(raw)} (from {where}) "
                f"is invalid: expected {expected}"
            ) from None
    return Settings(**values)
