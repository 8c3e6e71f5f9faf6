"""Settings from ``app.config`` and the environment, validated once at init_app.

Each ``SIGTRACE_*`` key (:data:`KEYS`) is read from ``app.config`` first, then
from an environment variable of the same name, then its default. A wrong type
or value raises :class:`ConfigError` naming the key, the value, where it came
from and what is expected; an unknown ``SIGTRACE_*`` key (a typo) raises too.

The ``OTEL_*`` variables sigtrace reads or hands to the OpenTelemetry SDK
(:data:`OTEL_KEYS`) are checked by :func:`check_environment` before anything
is patched or started: a bad value is either a :class:`ConfigError` or one
warning naming the variable, the value and the default used instead, as each
entry says. Suspicious but valid values (an OTLP timeout of hours, a pattern
that can never match) get one warning each.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import itertools
import logging
import math
import os
import re
import typing as t
import urllib.parse
from collections.abc import Callable, Mapping

from .metrics import DEFAULT_BUCKETS, DEFAULT_MAX_LABEL_VALUES
from .multiprocess_publisher import MAX_INTERVAL, MIN_INTERVAL
from .options import MAX_SLOW_THRESHOLD, Options
from .tracing import SPAN_MODES, SpanMode

__all__ = [
    "ConfigError",
    "KEYS",
    "OTEL_KEYS",
    "Settings",
    "check_environment",
    "check_exposure",
    "first_otel_value",
    "load_settings",
    "otel_value",
    "otlp_insecure",
    "otlp_metrics_requested",
]

log = logging.getLogger("sigtrace")


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


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _address(value: object) -> str:
    expected = "an IP address (127.0.0.1, ::1, 0.0.0.0) or a host name of this machine"
    if not isinstance(value, str) or not value.strip():
        raise TypeError(expected)
    address = value.strip()
    try:
        ipaddress.ip_address(address)
    except ValueError:
        if len(address) > 253 or not _HOSTNAME.fullmatch(address):
            raise TypeError(expected) from None
    return address


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


def _seconds(value: object, expected: str, within: t.Callable[[float], bool]) -> float:
    """A number of seconds (not a bool) for which ``within`` holds (NaN never does)."""
    if isinstance(value, bool):
        raise TypeError(expected)
    try:
        seconds = float(t.cast(t.Any, value))
    except (TypeError, ValueError, OverflowError):
        raise TypeError(expected) from None
    if not within(seconds):
        raise TypeError(expected)
    return seconds


def _publish_interval(value: object) -> float:
    expected = f"a number of seconds from {MIN_INTERVAL:g} to {MAX_INTERVAL:g}"
    return _seconds(value, expected, lambda seconds: MIN_INTERVAL <= seconds <= MAX_INTERVAL)


def _slow_threshold(value: object) -> float:
    expected = f"a positive number of seconds up to {MAX_SLOW_THRESHOLD:g}"
    return _seconds(value, expected, lambda seconds: 0 < seconds <= MAX_SLOW_THRESHOLD)


def _ui_path(value: object) -> str:
    path = _path(value)
    if path in ("", "/"):
        raise TypeError("a URL path below '/', e.g. '/sigtrace'")
    return path.rstrip("/")


def _trace_url(value: object) -> str | None:
    # The template becomes a link on the UI page: only http(s), never javascript: etc.
    expected = (
        "an http:// or https:// URL template containing {trace_id}, e.g. "
        "http://localhost:16686/trace/{trace_id} (or leave it unset)"
    )
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "{trace_id}" not in value:
        raise TypeError(expected)
    try:
        url = _endpoint(value.replace("{trace_id}", "0"))
    except TypeError:
        url = None
    if url is None or any(ch.isspace() for ch in value.strip()):
        raise TypeError(expected) from None
    return value.strip()


def _span_mode(value: object) -> str:
    if not isinstance(value, str) or value.strip().lower() not in SPAN_MODES:
        raise TypeError("one of " + ", ".join(repr(m) for m in SPAN_MODES))
    return value.strip().lower()


def _unclosed_bracket(pattern: str) -> bool:
    """fnmatch reads a ``[`` without a closing ``]`` as a literal ``[``."""
    start = pattern.find("[")
    while start >= 0:
        if "]" not in pattern[start + 2 :]:
            return True
        start = pattern.find("[", pattern.index("]", start + 2) + 1)
    return False


def _signal_patterns_note(value: object) -> str | None:
    literal = [p for p in _names(value) if _unclosed_bracket(p)]
    if literal:
        return (
            f"{', '.join(map(repr, literal))}: a '[' without a closing ']' is matched "
            "literally, so this only matches names containing that '['; close the "
            "set ('[ab]*') or drop the '['"
        )
    return None


def _path_patterns_note(value: object) -> str | None:
    never = [p for p in _names(value) if p[0] not in "/*?["]
    literal = [p for p in _names(value) if _unclosed_bracket(p)]
    notes = []
    if never:
        notes.append(
            f"{', '.join(map(repr, never))} can never match: request paths start "
            "with '/' (write '/health', or '*/health' for any prefix)"
        )
    if literal:
        notes.append(
            f"{', '.join(map(repr, literal))}: a '[' without a closing ']' is matched literally"
        )
    return "; ".join(notes) or None


class _Key(t.NamedTuple):
    """One setting: how it is parsed, its default and what it means.

    ``parse`` raises ``TypeError(what is expected)`` on a bad value. ``on_bad``
    says what a bad value does: ``"error"`` raises :class:`ConfigError`,
    ``"warn"`` logs one warning and uses ``default``. ``note(raw)`` returns a
    warning for a valid but suspicious value, or None.
    """

    parse: Callable[[object], t.Any]
    default: object
    doc: str
    on_bad: t.Literal["error", "warn"] = "error"
    note: Callable[[object], str | None] | None = None


KEYS: dict[str, _Key] = {
    "SIGTRACE_METRICS": _Key(_bool, True, "record Prometheus metrics"),
    "SIGTRACE_TRACING": _Key(_bool, True, "make OpenTelemetry spans"),
    "SIGTRACE_METRICS_PATH": _Key(_path, "/metrics", "route serving metrics; '' disables it"),
    "SIGTRACE_METRICS_PORT": _Key(_port, None, "port of a separate exposition server"),
    "SIGTRACE_METRICS_ADDR": _Key(
        _address, "127.0.0.1", "address that server binds (an IP address or host name)"
    ),
    "SIGTRACE_METRICS_TOKEN": _Key(_token, None, "bearer token the route and server require"),
    "SIGTRACE_SPANS": _Key(_span_mode, "all", "which spans: all, signals, receivers, slow, none"),
    "SIGTRACE_SLOW_THRESHOLD": _Key(
        _slow_threshold,
        0.001,
        "seconds a send or receiver takes to count as slow (its span under slow, the page)",
    ),
    "SIGTRACE_ROOT_SPANS": _Key(_bool, False, "make signal spans outside any span"),
    "SIGTRACE_INCLUDE_SIGNALS": _Key(
        _names, (), "only these signal name patterns", note=_signal_patterns_note
    ),
    "SIGTRACE_EXCLUDE_SIGNALS": _Key(
        _names, (), "never these signal name patterns", note=_signal_patterns_note
    ),
    "SIGTRACE_EXCLUDED_PATHS": _Key(
        _names, (), "request path patterns not timed", note=_path_patterns_note
    ),
    "SIGTRACE_RECORD_KWARGS": _Key(_names, (), "signal kwargs keys recorded on spans"),
    "SIGTRACE_BUCKETS": _Key(_buckets, DEFAULT_BUCKETS, "histogram bucket bounds, seconds"),
    "SIGTRACE_MAX_LABEL_VALUES": _Key(
        _positive_int, DEFAULT_MAX_LABEL_VALUES, "distinct values per label"
    ),
    "SIGTRACE_OTLP_ENDPOINT": _Key(_endpoint, None, "OTLP endpoint (else OTEL_*)"),
    "SIGTRACE_CONSOLE_SPANS": _Key(_bool, False, "print spans when no endpoint is set"),
    "SIGTRACE_PUBLISH_INTERVAL": _Key(
        _publish_interval, 1.0, "seconds between a worker's metric publishes (multiprocess)"
    ),
    "SIGTRACE_MULTIPROC_ALLOW_SHARED_DIR": _Key(
        _bool, False, "accept a multiprocess directory other users can write or own"
    ),
    "SIGTRACE_UI": _Key(_bool, False, "serve the signals page"),
    "SIGTRACE_UI_PATH": _Key(_ui_path, "/sigtrace", "route of the signals page"),
    "SIGTRACE_TRACE_URL": _Key(_trace_url, None, "trace link template with {trace_id}"),
}


_SECRET_KEYS = frozenset({"SIGTRACE_METRICS_TOKEN"})  # never echoed in errors


# ---------------------------------------------------------------------------
# OTEL_* variables: read by sigtrace, or by the SDK objects sigtrace builds.
# Each parser gets the stripped, non-blank value of the environment variable.


def _otel_bool(value: object) -> bool:
    text = str(value).lower()
    if text not in ("true", "false"):
        raise TypeError("'true' or 'false'")
    return text == "true"


def _choice(*allowed: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if str(value).lower() not in allowed:
            raise TypeError("one of " + ", ".join(repr(a) for a in allowed))
        return str(value).lower()

    return parse


def _number(kind: type[int] | type[float], minimum: float, unit: str) -> Callable[[object], t.Any]:
    expected = f"a {'whole ' if kind is int else ''}number of at least {minimum:g}{unit}"

    def parse(value: object) -> t.Any:
        try:
            number = kind(str(value))
        except ValueError:
            raise TypeError(expected) from None
        if not math.isfinite(number) or number < minimum:
            raise TypeError(expected)
        return number

    return parse


def _otlp_seconds(value: object) -> float:
    try:
        seconds: float = _number(float, 0, " seconds")(value)
    except TypeError:
        seconds = 0
    if seconds == 0:
        raise TypeError("a positive number of seconds")
    return seconds


def _seconds_not_milliseconds(value: object) -> str | None:
    try:
        seconds = float(str(value))
    except ValueError:
        return None
    if seconds > 60:
        return (
            "that is more than a minute: the Python OTLP exporters read this timeout in "
            "seconds, not milliseconds (write 10 for ten seconds)"
        )
    return None


TRACES_EXPORTERS = ("otlp", "console", "none")
"""The ``OTEL_TRACES_EXPORTER`` values sigtrace's own SDK set-up knows."""

METRICS_EXPORTERS = ("otlp", "prometheus", "console", "none")
"""The ``OTEL_METRICS_EXPORTER`` values of the specification (sigtrace acts on ``otlp``)."""


def _traces_exporters(value: object) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in str(value).split(",") if n.strip()))
    if any(n not in TRACES_EXPORTERS for n in names) or ("none" in names and len(names) > 1):
        raise TypeError("'otlp', 'console', 'otlp,console' or 'none'")
    return names


def _metrics_exporters(value: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.strip().lower() for n in str(value).split(",") if n.strip()))


def _unknown_metrics_exporters(value: object) -> str | None:
    unknown = [n for n in _metrics_exporters(value) if n not in METRICS_EXPORTERS]
    if unknown:
        return (
            f"{', '.join(map(repr, unknown))} is no metrics exporter (known: "
            f"{', '.join(METRICS_EXPORTERS)}); sigtrace pushes metrics over OTLP only "
            "with 'otlp' in the list and ignores the rest"
        )
    return None


# OTLP headers and resource attributes: comma-separated name=value, values URL-encoded
# (the SDK's own format; it skips, with a warning of its own, a pair it cannot read)
_PAIR = re.compile(r"\s*[A-Za-z0-9!#$%&'*+.^_`|~/-]+\s*=\s*[^,]*")


def _pairs(value: object) -> str:
    return str(value)


def _unreadable_pairs(value: object) -> str | None:
    bad = [p for p in str(value).split(",") if p.strip() and not _PAIR.fullmatch(p)]
    if bad:
        return (
            f"{', '.join(map(repr, bad))} is not name=value (values URL-encoded) and is "
            "left out by the OpenTelemetry SDK"
        )
    return None


def _readable_file(value: object) -> str:
    if not os.path.isfile(str(value)) or not os.access(str(value), os.R_OK):
        raise TypeError("the path of a readable PEM file")
    return str(value)


def _compiled(value: object) -> tuple[list[str], list[str]]:
    """OTel's excluded-URL list (comma-separated regular expressions) split into the
    valid entries and the invalid ones, each with the reason."""
    valid, invalid = [], []
    for part in (p.strip() for p in str(value).split(",")):
        try:
            re.compile(part)
        except re.error as error:
            invalid.append(f"{part!r} ({error})")
            continue
        if part:
            valid.append(part)
    return valid, invalid


def _regexes(value: object) -> tuple[str, ...]:
    """The valid regular expressions: an invalid one is left out (and warned about)."""
    return tuple(_compiled(value)[0])


def _invalid_regexes(value: object) -> str | None:
    invalid = _compiled(value)[1]
    if invalid:
        return f"{', '.join(invalid)} is not a valid regular expression and is ignored"
    return None


def _propagators(value: object) -> tuple[str, ...]:
    """``OTEL_PROPAGATORS``: names of installed propagators (entry points of the
    ``opentelemetry_propagator`` group), or ``none``. The OpenTelemetry API raises
    on any other name when ``opentelemetry.propagate`` is imported."""
    from importlib.metadata import entry_points

    names = tuple(n.strip() for n in str(value).split(",") if n.strip())
    installed = {ep.name for ep in entry_points(group="opentelemetry_propagator")}
    if any(n.lower() != "none" and n not in installed for n in names):
        raise TypeError(
            "names of installed propagators ("
            + ", ".join(sorted(installed | {"none"}))
            + "); others need their package installed"
        )
    return names


_HOST_PORT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


def _otel_endpoint(value: object) -> str | None:
    """An ``OTEL_EXPORTER_OTLP_*ENDPOINT``: a URL as for ``SIGTRACE_OTLP_ENDPOINT``, or
    ``host:port`` without a scheme, which the gRPC exporter takes too (TLS then
    follows ``…_INSECURE``)."""
    try:
        return _endpoint(value)
    except TypeError:
        found = _HOST_PORT.fullmatch(str(value).strip())
        if found is None or int(found.group(1)) > 65535:
            raise TypeError(
                "an absolute http:// or https:// URL with a host, e.g. "
                "http://localhost:4317 (or host:port for gRPC)"
            ) from None
        return str(value).strip()


_OTLP_SIGNALS = ("", "TRACES_", "METRICS_")
"""``OTEL_EXPORTER_OTLP_{,TRACES_,METRICS_}<X>``: the generic variable and its per-signal ones."""


def _per_signal(suffix: str, key: _Key) -> dict[str, _Key]:
    return {f"OTEL_EXPORTER_OTLP_{signal}{suffix}": key for signal in _OTLP_SIGNALS}


def _count(minimum: int, default: int, doc: str) -> _Key:
    """A whole number of at least ``minimum``; a bad one is warned about, ``default`` used."""
    return _Key(_number(int, minimum, ""), default, doc, "warn")


_UNLIMITED = -1  # SpanLimits.UNSET: no limit on an attribute value's length

BY_SCHEME = "by the endpoint's scheme (http:// without TLS)"
"""The default of ``OTEL_EXPORTER_OTLP_[TRACES_]INSECURE``: no fixed value."""

OTEL_KEYS: dict[str, _Key] = {
    "OTEL_SDK_DISABLED": _Key(_otel_bool, False, "no SDK set-up at all", "warn"),
    "OTEL_TRACES_EXPORTER": _Key(
        _traces_exporters, (), "otlp, console, otlp,console or none (unset: by endpoint)"
    ),
    "OTEL_PROPAGATORS": _Key(
        _propagators, ("tracecontext", "baggage"), "how trace context is read from requests"
    ),
    "OTEL_METRICS_EXPORTER": _Key(
        _metrics_exporters,
        (),
        "list with 'otlp': push metrics over OTLP",
        "warn",
        _unknown_metrics_exporters,
    ),
    **_per_signal("ENDPOINT", _Key(_otel_endpoint, None, "OTLP endpoint URL (gRPC: host:port)")),
    **_per_signal(
        "PROTOCOL", _Key(_choice("grpc", "http/protobuf"), "grpc", "OTLP protocol", "warn")
    ),
    **_per_signal(
        "COMPRESSION",
        _Key(
            _choice("gzip", "deflate", "none"), "none", "OTLP compression (deflate: HTTP)", "warn"
        ),
    ),
    **_per_signal(
        "TIMEOUT",
        _Key(
            _otlp_seconds,
            10.0,
            "OTLP export timeout, in seconds",
            "warn",
            _seconds_not_milliseconds,
        ),
    ),
    **_per_signal(
        "INSECURE",
        _Key(_otel_bool, BY_SCHEME, "gRPC without TLS (unset: by the endpoint's scheme)", "warn"),
    ),
    **_per_signal("HEADERS", _Key(_pairs, "", "OTLP request headers", "warn", _unreadable_pairs)),
    # TLS files: an error, since the exporters would export without them (gRPC) or fail
    # every export (HTTP), whatever sigtrace passes
    **_per_signal(
        "CERTIFICATE", _Key(_readable_file, None, "CA certificates (PEM) of the collector")
    ),
    **_per_signal("CLIENT_KEY", _Key(_readable_file, None, "client key (PEM, mTLS)")),
    **_per_signal(
        "CLIENT_CERTIFICATE", _Key(_readable_file, None, "client certificate (PEM, mTLS)")
    ),
    "OTEL_RESOURCE_ATTRIBUTES": _Key(
        _pairs, "", "resource attributes of spans and OTLP metrics", "warn", _unreadable_pairs
    ),
    "OTEL_BSP_SCHEDULE_DELAY": _Key(
        _number(float, 0, " ms"), 5000.0, "ms between two span exports", "warn"
    ),
    "OTEL_BSP_EXPORT_TIMEOUT": _Key(
        _number(float, 0, " ms"), 30000.0, "ms an export of spans may take", "warn"
    ),
    "OTEL_BSP_MAX_QUEUE_SIZE": _count(1, 2048, "spans queued for export"),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": _count(1, 512, "spans per export (at most the queue size)"),
    "OTEL_ATTRIBUTE_COUNT_LIMIT": _count(0, 128, "attributes per span, event or link"),
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": _count(0, _UNLIMITED, "characters per attribute value"),
    # an error, not a warning: the SDK reads it when imported, and cannot be imported with it
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": _Key(_number(int, 0, ""), 128, "attributes per span"),
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": _count(
        0, _UNLIMITED, "characters per span attribute value"
    ),
    "OTEL_SPAN_EVENT_COUNT_LIMIT": _count(0, 128, "events per span"),
    "OTEL_SPAN_LINK_COUNT_LIMIT": _count(0, 128, "links per span"),
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT": _count(0, 128, "attributes per span event"),
    "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT": _count(0, 128, "attributes per span link"),
    "OTEL_METRIC_EXPORT_INTERVAL": _Key(
        _number(float, 1, " ms"), 60000.0, "ms between two metric exports (OTLP)"
    ),
    "OTEL_METRIC_EXPORT_TIMEOUT": _Key(
        _number(float, 1, " ms"), 30000.0, "ms a metric export may take (OTLP)"
    ),
    "OTEL_PYTHON_FLASK_EXCLUDED_URLS": _Key(
        _regexes, (), "regexes of request URLs not timed or traced", "warn", _invalid_regexes
    ),
    "OTEL_PYTHON_EXCLUDED_URLS": _Key(
        _regexes, (), "the same, for every instrumentation", "warn", _invalid_regexes
    ),
}
"""The ``OTEL_*`` variables sigtrace validates (environment only)."""

_OTLP_METRICS_ONLY = frozenset(
    {
        "OTEL_METRIC_EXPORT_INTERVAL",
        "OTEL_METRIC_EXPORT_TIMEOUT",
        *(key for key in OTEL_KEYS if key.startswith("OTEL_EXPORTER_OTLP_METRICS_")),
    }
)
"""Read only when metrics are pushed over OTLP: checked only then."""

_STRICT_WITH_OTLP_METRICS = frozenset(
    {"OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"}
)
"""Bad values that are a ConfigError when metrics are pushed over OTLP (the metric
exporter cannot fall back), a warning otherwise."""


def otlp_metrics_requested(environ: Mapping[str, str] | None = None) -> bool:
    """``OTEL_METRICS_EXPORTER`` lists ``otlp`` (and ``OTEL_SDK_DISABLED`` is not true)."""
    environ = os.environ if environ is None else environ
    exporters = _metrics_exporters(environ.get("OTEL_METRICS_EXPORTER", ""))
    return "otlp" in exporters and not otel_value("OTEL_SDK_DISABLED", environ)


def otel_value(name: str, environ: Mapping[str, str] | None = None) -> t.Any:
    """``name``'s parsed value, or its default when unset, blank or bad (quietly:
    :func:`check_environment` has said so)."""
    environ = os.environ if environ is None else environ
    spec = OTEL_KEYS[name]
    raw = environ.get(name, "").strip()
    if not raw:
        return spec.default
    try:
        return spec.parse(raw)
    except TypeError:
        return spec.default


def first_otel_value(names: tuple[str, ...], environ: Mapping[str, str] | None = None) -> t.Any:
    """The value of the first of ``names`` that is set (the per-signal variable before the
    generic one), else the last one's default."""
    environ = os.environ if environ is None else environ
    for name in names:
        if environ.get(name, "").strip():
            return otel_value(name, environ)
    return OTEL_KEYS[names[-1]].default


def otlp_insecure(signal: t.Literal["TRACES", "METRICS"], endpoint: str | None = None) -> bool:
    """Whether the gRPC exporter of ``signal`` goes without TLS: the
    ``OTEL_EXPORTER_OTLP_[<signal>_]INSECURE`` value when valid; else (unset or bad),
    as the exporter decides when it is unset, by the scheme of ``endpoint`` or the
    configured one (``http://`` without TLS). Passed to the exporter, which would
    read a bad value as false and ignore the scheme."""
    names = (f"OTEL_EXPORTER_OTLP_{signal}_", "OTEL_EXPORTER_OTLP_")
    insecure = first_otel_value(tuple(name + "INSECURE" for name in names))
    if isinstance(insecure, bool):
        return insecure
    target = endpoint or first_otel_value(tuple(name + "ENDPOINT" for name in names))
    return urllib.parse.urlsplit(target or "http://localhost:4317").scheme == "http"


def _default_shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value == BY_SCHEME:
        return BY_SCHEME
    if isinstance(value, float):
        return f"{value:g}"
    if value == _UNLIMITED:
        return "no limit"
    if value in ((), None, ""):
        return "none"
    return _shown(value)


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Check every ``OTEL_*`` variable of :data:`OTEL_KEYS` that is set.

    Raises :class:`ConfigError` for the first bad value whose entry says
    ``"error"``; logs one warning per bad ``"warn"`` value (the default is used)
    and one per suspicious value. Variables read only for metrics over OTLP are
    checked only when ``OTEL_METRICS_EXPORTER`` asks for it.
    """
    environ = os.environ if environ is None else environ
    otlp_metrics = otlp_metrics_requested(environ)
    warnings: list[str] = []
    for name, spec in OTEL_KEYS.items():
        raw = environ.get(name, "").strip()
        if not raw or (name in _OTLP_METRICS_ONLY and not otlp_metrics):
            continue
        try:
            spec.parse(raw)
        except TypeError as expected:
            if spec.on_bad == "error" or (otlp_metrics and name in _STRICT_WITH_OTLP_METRICS):
                raise ConfigError(
                    f"{name}={_shown(raw)} (from the environment) is invalid: expected "
                    f"{expected}; fix it or unset it where the process is started"
                ) from None
            warnings.append(
                f"{name}={_shown(raw)} is invalid: expected {expected}; using the default, "
                f"{_default_shown(spec.default)}"
            )
            continue
        note = spec.note(raw) if spec.note is not None else None
        if note is not None:
            warnings.append(f"{name}={_shown(raw)}: {note}")
    batch = otel_value("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", environ)
    queue = otel_value("OTEL_BSP_MAX_QUEUE_SIZE", environ)
    if batch > queue:
        warnings.append(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE={batch} is larger than OTEL_BSP_MAX_QUEUE_SIZE="
            f"{queue}; using the queue size, {queue}, as the batch size"
        )
    for warning in warnings:
        log.warning("sigtrace: %s", warning)


def _is_loopback(address: str) -> bool:
    if address.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_exposure(settings: Settings, metrics_auth: bool) -> None:
    """Warn when the separate metrics server listens beyond this host unguarded."""
    if (
        settings.metrics
        and settings.metrics_port is not None
        and settings.metrics_token is None
        and not metrics_auth
        and not _is_loopback(settings.metrics_addr)
    ):
        log.warning(
            "sigtrace: SIGTRACE_METRICS_ADDR=%r serves the metrics beyond this host "
            "without SIGTRACE_METRICS_TOKEN or metrics_auth: anyone who can reach port %s "
            "can read them; set SIGTRACE_METRICS_TOKEN, or bind 127.0.0.1 and let a "
            "proxy or the scraper on this host reach it",
            settings.metrics_addr,
            settings.metrics_port,
        )


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
    multiproc_allow_shared_dir: bool = False
    ui: bool = False
    ui_path: str = "/sigtrace"
    trace_url: str | None = None

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
            fix = (
                f"app.config[{key!r}]"
                if where == "app.config"
                else f"{key} in the environment the app is started with"
            )
            raise ConfigError(
                f"{key}={'<redacted>' if key in _SECRET_KEYS else _shown(raw)} (from {where}) "
                f"is invalid: expected {expected}; fix or remove {fix}"
            ) from None
        note = spec.note(raw) if spec.note is not None else None
        if note is not None:
            log.warning("sigtrace: %s=%s (from %s): %s", key, _shown(raw), where, note)
    return Settings(**values)
