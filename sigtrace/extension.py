"""``SigTrace``: the Flask extension (config, request lifecycle, /metrics, CLI).

Request timing uses Flask's own hooks, not signal receivers and not code in
the traced send:

* the app's WSGI callable, wrapped (Flask's documented place for code around
  every request): start the clock, and the SERVER span unless a recording
  span is already current or opentelemetry-instrumentation-flask will make
  one, current from before ``request_started`` to after
  ``request_tearing_down``; on the way out, record the request with the
  status the app answered (500 if the exception propagated) and end the span;
* the app's ``handle_exception``, wrapped (Flask calls it only for an
  unhandled exception, the one ``got_request_exception`` reports): the
  exception counted, and marked on the span; an exception that is not an
  ``Exception`` is counted as it propagates out of the WSGI callable;
* the ``start_response`` the app calls (the request context is still pushed
  then): the matched route and endpoint (the span's name and
  ``http.route``). Not a ``teardown_request`` hook, whose dispatch by Flask
  (``ensure_sync`` at every call) costs more per request than the rest of
  metrics-only timing together;
* with a ``request_hook``, a ``url_value_preprocessor`` names the request as
  soon as Flask has matched its URL and calls the hook; with a
  ``response_hook``, ``after_request`` keeps the response for it.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
import typing as t
from contextvars import Token
from time import perf_counter

import flask
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter
from opentelemetry.semconv.attributes.client_attributes import CLIENT_ADDRESS
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
)
from opentelemetry.semconv.attributes.network_attributes import NETWORK_PROTOCOL_VERSION
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.semconv.attributes.url_attributes import URL_PATH, URL_SCHEME
from opentelemetry.semconv.attributes.user_agent_attributes import USER_AGENT_ORIGINAL
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.http import ExcludeList
from prometheus_client import CollectorRegistry
from werkzeug.wsgi import get_current_url, get_path_info

from . import (
    dispatch,
    lifecycle,
    multiprocess_directory,
    multiprocess_publisher,
    server_span,
    tracing,
)
from .bindings import exemplar_of
from .config import (
    ConfigError,
    Settings,
    check_environment,
    check_exposure,
    first_otel_value,
    load_settings,
)
from .faults import internal_error
from .metrics import MetricSet, metric_set
from .naming import clean_label
from .routes import add_route, check_route
from .server_span import ServerSpan

__all__ = ["RequestHook", "ResponseHook", "SigTrace", "UNMATCHED_ENDPOINT"]

log = logging.getLogger("sigtrace")

RequestHook = t.Callable[[trace.Span, flask.Request], None]
"""``request_hook(span, request)``: called when sigtrace's server span starts."""
ResponseHook = t.Callable[[trace.Span, flask.Response], None]
"""``response_hook(span, response)``: called before sigtrace's server span ends."""

UNMATCHED_ENDPOINT = "<unmatched>"
"""Endpoint label of requests no route matched (404, 405 before routing)."""

_KNOWN_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
_ENVIRON_KEY = "sigtrace.request"
_METRICS_ENDPOINT = "sigtrace_metrics"
_UI_ENDPOINT = "sigtrace_ui"


class _AppState:
    """What one app's request hooks need, computed at init_app."""

    def __init__(self, ext: SigTrace, settings: Settings, metrics: MetricSet | None) -> None:
        self.ext = ext
        self.settings = settings
        self.metrics = metrics
        self.tracer = tracing.get_tracer(ext.tracer_provider) if settings.tracing else None
        own_paths: tuple[str, ...] = (settings.metrics_path,) if settings.metrics_path else ()
        if settings.ui:
            own_paths += (settings.ui_path, settings.ui_path + "/*")
        self.is_excluded = _path_matcher((*settings.excluded_paths, *own_paths))
        # OTel's regexes (OTEL_PYTHON_FLASK_EXCLUDED_URLS, else OTEL_PYTHON_EXCLUDED_URLS),
        # searched in the full URL as opentelemetry-instrumentation-flask does; the
        # invalid ones left out (check_environment warned about them)
        self.url_excluded: t.Callable[[str], bool] | None = None
        urls = first_otel_value(("OTEL_PYTHON_FLASK_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS"))
        if urls:
            self.url_excluded = ExcludeList(list(urls)).url_disabled
        # imported here, not with this module: with a bad OTEL_PROPAGATORS the import raises,
        # and check_environment has said so as a ConfigError first
        from opentelemetry import propagate

        self.extract = propagate.extract
        self.textmap = propagate.get_global_textmap
        self.durations: dict[tuple[str, str, str], t.Any] = {}
        self.metrics_port: int | None = None
        """Bound port of the separate exposition server (SIGTRACE_METRICS_PORT)."""
        self.publisher: multiprocess_publisher.Publisher | None = None
        """Publishes this process's metrics under PROMETHEUS_MULTIPROC_DIR."""
        self.dashboard: t.Any = None
        """The signals page (sigtrace.ui.Dashboard) when SIGTRACE_UI is on."""
        self.stops: list[t.Callable[[], object]] = []
        """What undoes each thing init_app started for this app, in start order."""

    def stop(self) -> None:
        """Undo what init_app started for this app, last first."""
        while self.stops:
            self.stops.pop()()


def _path_matcher(patterns: t.Iterable[str]) -> t.Callable[[str], bool]:
    """One compiled test for all excluded-path patterns (a set for exact paths)."""
    exact = frozenset(p for p in patterns if not any(c in p for c in "*?["))
    globs = [fnmatch.translate(p) for p in patterns if p not in exact]
    if not globs:
        return exact.__contains__
    pattern = re.compile("|".join(globs))
    return lambda path: path in exact or pattern.match(path) is not None


class _Request:
    """One request in flight, kept in its WSGI environ."""

    __slots__ = (
        "endpoint",
        "exception",
        "method",
        "named",
        "response",
        "route",
        "span",
        "started",
        "state",
        "status",
        "token",
    )

    def __init__(self, state: _AppState, method: str) -> None:
        self.state = state
        self.method = method
        self.endpoint = UNMATCHED_ENDPOINT
        self.named = False
        self.span: trace.Span | None = None
        self.token: Token[Context] | None = None
        self.exception: BaseException | None = None
        self.response: t.Any = None
        self.route: str | None = None  # the matched URL rule
        self.status = 500  # until the app answers
        self.started = perf_counter()

    def finish(self) -> None:
        """Record the request and end its span: called exactly once."""
        elapsed = perf_counter() - self.started
        status = self.status
        span = self.span
        exemplar = None
        if span is not None:
            exemplar = exemplar_of(span)
            hook = self.state.ext.response_hook
            if hook is not None and self.response is not None:
                _call_hook("response_hook", hook, span, self.response)
            own: dict[str, t.Any] = {}
            name = None
            if self.route is not None:
                name = f"{self.method} {self.route}"
                own[HTTP_ROUTE] = self.route
            own[HTTP_RESPONSE_STATUS_CODE] = status
            if status >= 500:
                if self.exception is not None:
                    own[ERROR_TYPE] = tracing.qualified_class_name(self.exception)
                else:
                    own[ERROR_TYPE] = str(status)
                    span.set_status(Status(StatusCode.ERROR))
            if type(span) is ServerSpan:
                span.set_own_attributes(own, name)
            else:
                if name is not None:
                    span.update_name(name)
                span.set_attributes(own)
            if self.token is not None:
                try:
                    tracing.reset(self.token)
                except Exception:  # a token of another context: logged as OpenTelemetry does
                    otel_context.detach(self.token)
            span.end()
        # Last: a failing metric backend must not leave the span open and attached.
        metrics = self.state.metrics
        if metrics is not None:
            key = (self.method, self.endpoint, str(status))
            child = self.state.durations.get(key)
            if child is None:
                child = self.state.durations[key] = metrics.http_duration.child(*key)
            child.observe(elapsed, exemplar)


class _TimedWSGI:
    """``app.wsgi_app``, timed: each request is recorded and traced around Flask's handling."""

    def __init__(self, app: flask.Flask, wsgi_app: t.Callable[..., t.Any]) -> None:
        self.app = app
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, t.Any], start_response: t.Callable[..., t.Any]) -> t.Any:
        state: _AppState | None = self.app.extensions.get("sigtrace")
        record = None
        if state is not None:
            try:
                record = _start_request(self.app, state, environ)
            except Exception:
                internal_error("request start")
        if record is None:
            return self.wsgi_app(environ, start_response)

        def start(status: str, headers: t.Any, exc_info: t.Any = None) -> t.Any:
            code = status.split(" ", 1)[0]
            if code.isdigit():
                record.status = int(code)
            if not record.named:
                _name_answered(record)
            return start_response(status, headers, exc_info)

        try:
            result = self.wsgi_app(environ, start)
        except BaseException as exc:  # propagated (PROPAGATE_EXCEPTIONS): answered as 500
            record.status = 500
            if record.exception is None and not isinstance(exc, Exception):
                _count_propagated(record, exc)  # KeyboardInterrupt, SystemExit: unseen by Flask
            record.exception = record.exception or exc
            _finish(record)
            raise
        _finish(record)
        return result


def _name_answered(record: _Request) -> None:
    """The request's name, from the request Flask is answering."""
    try:
        if flask.has_request_context():  # else a middleware called start_response late
            _name(record, flask.request._get_current_object())  # type: ignore[attr-defined]
    except Exception:
        internal_error("request naming")


def _count_propagated(record: _Request, exc: BaseException) -> None:
    try:
        _count_exception(record, exc)
    except Exception:
        internal_error("request exception")


def _finish(record: _Request) -> None:
    try:
        record.finish()
        if record.state.publisher is not None:
            record.state.publisher.after_request()  # publishes only where no thread runs
    except Exception:
        internal_error("request end")


def _start_request(app: t.Any, state: _AppState, environ: dict[str, t.Any]) -> _Request | None:
    """The request's record and span, or None for an excluded path."""
    if state.publisher is not None:
        state.publisher.ensure_started()  # multiprocess: from this process's first request
    path = "/" + get_path_info(environ).lstrip("/")
    if state.is_excluded(path) or (
        state.url_excluded is not None and state.url_excluded(get_current_url(environ))
    ):
        return None
    method = str(environ.get("REQUEST_METHOD", "GET")).upper()
    method = method if method in _KNOWN_METHODS else "_OTHER"
    record = _Request(state, method)
    environ[_ENVIRON_KEY] = record
    if state.tracer is None or tracing.recording_parent():
        return record  # no tracing, or nested under the caller's span
    if getattr(app, "_is_instrumented_by_opentelemetry", False):
        return record  # opentelemetry-instrumentation-flask makes the server span
    parent = _parent_context(state, environ)
    attributes: dict[str, t.Any] = {
        HTTP_REQUEST_METHOD: method,
        URL_PATH: path,
        URL_SCHEME: environ.get("wsgi.url_scheme", "http"),
    }
    _add_connection_attributes(attributes, environ)
    # Named by its route once Flask has matched the URL (_name_request).
    span = server_span.start_span(state.tracer, method, parent, attributes)
    record.span = span
    # trace.set_span_in_context(span, parent), without its calls
    record.token = tracing.attach(Context({**parent, tracing.SPAN_KEY: span}))
    return record


def _parent_context(state: _AppState, environ: dict[str, t.Any]) -> Context:
    """The context the request's span starts in: what ``propagate.extract`` finds in the
    request's headers.

    With OpenTelemetry's default propagators (``tracecontext,baggage``, in that
    order) and neither of their headers in the request, that is an empty Context
    (the first returns a new one, the second returns what it is given), so
    that is returned without calling them: about 14,000 instructions a request.
    Hand-written because the propagators offer no cheaper check;
    ``tests/test_extension.py`` compares the answers.
    """
    if (
        "HTTP_TRACEPARENT" not in environ
        and "HTTP_BAGGAGE" not in environ
        and _w3c_defaults(state.textmap())
    ):
        return Context()
    return state.extract(environ, getter=_ENVIRON_GETTER)


_W3C_DEFAULTS = (TraceContextTextMapPropagator, W3CBaggagePropagator)
_last_textmap: list[t.Any] = [None, False]  # the last propagator checked, and the answer


def _w3c_defaults(textmap: t.Any) -> bool:
    """Whether ``textmap`` is the default composite: W3C trace context, then baggage."""
    last = _last_textmap
    if last[0] is not textmap:
        propagators = getattr(textmap, "_propagators", None)
        last[1] = (
            type(textmap) is CompositePropagator
            and isinstance(propagators, (list, tuple))
            and tuple(type(p) for p in propagators) == _W3C_DEFAULTS
        )
        last[0] = textmap
    return last[1]  # type: ignore[no-any-return]


class _EnvironGetter(Getter[dict[str, t.Any]]):
    """Request headers for the propagators, read from the WSGI environ.

    What opentelemetry-instrumentation-wsgi's ``WSGIGetter`` does (that package
    is not a dependency); cheaper than werkzeug's ``EnvironHeaders``, whose
    lookups of absent headers raise and catch a ``KeyError`` each.
    """

    def get(self, carrier: dict[str, t.Any], key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        return None if value is None else [value]

    def keys(self, carrier: dict[str, t.Any]) -> list[str]:
        return [k[5:].lower().replace("_", "-") for k in carrier if k.startswith("HTTP_")]


_ENVIRON_GETTER = _EnvironGetter()


def _current() -> tuple[t.Any, _Request | None]:
    """The request (Flask's hooks run inside one) and sigtrace's record of it."""
    request = flask.request._get_current_object()  # type: ignore[attr-defined]
    return request, request.environ.get(_ENVIRON_KEY)


def _name_request(_endpoint: str | None = None, _values: t.Any = None) -> None:
    """url_value_preprocessor, registered only for a ``request_hook``: name the request
    as soon as Flask has matched its URL, and call the hook with its span."""
    try:
        request, record = _current()
        if record is None or record.named:
            return
        _name(record, request)
        span, hook = record.span, record.state.ext.request_hook
        if span is not None and hook is not None:
            if record.route is not None:
                span.set_attribute(HTTP_ROUTE, record.route)
                span.update_name(f"{record.method} {record.route}")
            _call_hook("request_hook", hook, span, request)
    except Exception:
        internal_error("request naming")


def _name(record: _Request, request: t.Any) -> None:
    """The endpoint label and the route (set on the span when it ends)."""
    record.named = True
    rule = request.url_rule
    if rule is not None:
        record.endpoint = clean_label(rule.endpoint)
        record.route = rule.rule


def _keep_response(response: flask.Response) -> flask.Response:
    """after_request: the response the user's response_hook gets."""
    try:
        _request, record = _current()
        if record is not None:
            record.response = response
    except Exception:
        internal_error("request response")
    return response


def _note_exception(app: flask.Flask, exc: Exception) -> None:
    """From ``handle_exception``: the request's name (endpoint, route) and its unhandled
    exception (the one got_request_exception reports), unless the app ignores it."""
    try:
        request, record = _current()
        if record is not None and record.exception is None and not app.should_ignore_error(exc):
            if not record.named:
                _name(record, request)
            _count_exception(record, exc)
    except Exception:
        internal_error("request exception")


def _wrap_handle_exception(app: flask.Flask) -> None:
    handle = app.handle_exception

    @functools.wraps(handle)
    def handle_exception(e: Exception) -> t.Any:
        _note_exception(app, e)
        return handle(e)

    app.handle_exception = handle_exception  # type: ignore[method-assign]


def _count_exception(record: _Request, exc: BaseException) -> None:
    record.exception = exc
    metrics = record.state.metrics
    if metrics is not None:
        metrics.http_exceptions.child(
            record.method, record.endpoint, clean_label(type(exc).__name__)
        ).inc()
    if record.span is not None:
        tracing.mark_error(record.span, exc)


def _add_connection_attributes(attributes: dict[str, t.Any], environ: dict[str, t.Any]) -> None:
    """The server span's recommended HTTP attributes, read straight from the WSGI environ.

    ``server.address`` / ``server.port`` from the Host header (else the WSGI
    server's name and port), ``client.address`` from the peer (``REMOTE_ADDR``:
    behind a proxy, werkzeug's ``ProxyFix`` puts the client there),
    ``user_agent.original``, and ``network.protocol.version`` (``1.1``).
    """
    host = environ.get("HTTP_HOST")
    address: str | None
    port: str | None
    if host:
        name, colon, host_port = host.rpartition(":")
        if colon and host_port.isdigit() and (not name.startswith("[") or name.endswith("]")):
            address, port = name, host_port  # "shop.example:8080", "[::1]:8080"
        else:
            address, port = host, environ.get("SERVER_PORT")  # no port in the header
    else:
        address, port = environ.get("SERVER_NAME"), environ.get("SERVER_PORT")
    if address:
        attributes[SERVER_ADDRESS] = address.strip("[]")
    if port and port.isdigit():
        attributes[SERVER_PORT] = int(port)
    client = environ.get("REMOTE_ADDR")
    if client:
        attributes[CLIENT_ADDRESS] = client
    agent = environ.get("HTTP_USER_AGENT")
    if agent:
        attributes[USER_AGENT_ORIGINAL] = agent
    protocol = environ.get("SERVER_PROTOCOL", "")
    if protocol.startswith("HTTP/"):
        attributes[NETWORK_PROTOCOL_VERSION] = protocol[5:]


_hooks_failed: set[str] = set()


def _call_hook(name: str, hook: t.Callable[..., object], span: trace.Span, arg: t.Any) -> None:
    """Call the user's hook; its exception is logged (once per hook kind), never raised."""
    try:
        hook(span, arg)
    except Exception:
        if name not in _hooks_failed:
            _hooks_failed.add(name)
            log.warning(
                "sigtrace: the %s passed to SigTrace raised; the request goes on (logged once)",
                name,
                exc_info=True,
            )


def _time_requests(app: flask.Flask, ext: SigTrace) -> None:
    """Wrap the app's WSGI callable and ``handle_exception``, once per app, and register
    the hooks the user's request and response hooks need, when they are given."""
    if not getattr(app, "_sigtrace_timed", False):
        app.wsgi_app = _TimedWSGI(app, app.wsgi_app)  # type: ignore[method-assign]
        _wrap_handle_exception(app)
        app._sigtrace_timed = True  # type: ignore[attr-defined]
    if ext.request_hook is not None and _name_request not in app.url_value_preprocessors[None]:
        app.url_value_preprocessor(_name_request)
    if ext.response_hook is not None and _keep_response not in app.after_request_funcs[None]:
        app.after_request(_keep_response)


MetricsAuth = t.Callable[[flask.Request], bool]


class SigTrace:
    """Observe a Flask app's signals, requests and exceptions.

    ``SigTrace(app)``, or ``SigTrace()`` then :meth:`init_app` in an app
    factory. Settings come from ``app.config`` / the environment (see
    docs/configuration.md); the state is ``app.extensions["sigtrace"]``.

    :param registry: Prometheus registry for all metrics (default: the global one).
    :param tracer_provider: OpenTelemetry provider (default: the global one; when
        none is configured and an OTLP endpoint is, sigtrace sets up the SDK).
    :param metrics_auth: ``check(request) -> bool`` guarding the metrics route.
    :param request_hook: ``hook(span, request)``, called when sigtrace's server
        span starts (not when opentelemetry-instrumentation-flask makes the span:
        its own hooks apply then).
    :param response_hook: ``hook(span, response)``, called before that span ends
        (not for a request whose ``request_finished`` never came: there is no
        response). An exception in either hook is logged once and swallowed.
    """

    def __init__(
        self,
        app: flask.Flask | None = None,
        *,
        registry: CollectorRegistry | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        metrics_auth: MetricsAuth | None = None,
        request_hook: RequestHook | None = None,
        response_hook: ResponseHook | None = None,
    ) -> None:
        self.registry = registry
        self.tracer_provider = tracer_provider
        self.metrics_auth = metrics_auth
        self.request_hook = request_hook
        self.response_hook = response_hook
        self._apps: list[flask.Flask] = []
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Validate the settings and instrument ``app`` (and every blinker signal).

        Everything that can be refused is checked before anything is patched or
        started; a :class:`ConfigError` leaves blinker, the app and the process
        as they were.
        """
        if "sigtrace" in app.extensions:
            raise ConfigError(f"SigTrace is already initialised on app {app.name!r}")
        settings = load_settings(app.config)
        check_environment()
        exporters = tracing.traces_exporters() if settings.tracing else ()
        path = multiprocess_directory.directory()
        if settings.metrics and path is not None:
            multiprocess_publisher.check_at_init(path, settings.multiproc_allow_shared_dir)
        if settings.metrics and settings.metrics_path:
            check_route(app, "SIGTRACE_METRICS_PATH", settings.metrics_path)
        if settings.ui:
            check_route(app, "SIGTRACE_UI_PATH", settings.ui_path)
        if settings.metrics and settings.metrics_port is not None:
            check_exposure(settings, self.metrics_auth is not None)
        undo: list[t.Callable[[], object]] = []
        try:
            metrics_port: int | None = None
            if settings.metrics and settings.metrics_port is not None:
                from .exposition import start_configured_server, stop_server

                metrics_port = start_configured_server(settings, self.registry, self.metrics_auth)
                undo.append(functools.partial(stop_server, metrics_port, settings.metrics_addr))
            dispatch.instrument(settings.instrument_options(self.registry, self.tracer_provider))
            undo.append(dispatch.uninstrument)
            metrics = None
            if settings.metrics:
                metrics = dispatch.active_metrics() or metric_set(
                    self.registry, settings.buckets, settings.max_label_values
                )
            state = _AppState(self, settings, metrics)
            state.stops = undo
            state.metrics_port = metrics_port
            self._start(app, state, exporters)
        except BaseException:
            app.extensions.pop("sigtrace", None)
            while undo:
                undo.pop()()
            raise
        from .cli import sigtrace_cli

        app.cli.add_command(sigtrace_cli)
        self._apps.append(app)

    def _start(self, app: flask.Flask, state: _AppState, exporters: tuple[str, ...]) -> None:
        """The rest of init_app, once blinker is patched; each start adds its undo to
        ``state.stops`` (validated: nothing here is expected to fail; init_app undoes
        it all if it does). What cannot be undone comes last: the SDK's global
        provider, then the app's route."""
        settings, metrics = state.settings, state.metrics
        if metrics is not None:
            state.publisher = multiprocess_publisher.attach(metrics, settings.publish_interval)
            if state.publisher is not None:
                state.stops.append(multiprocess_publisher.detach)
            from . import otlp_metrics

            pusher = otlp_metrics.start(metrics, app.name)  # with OTEL_METRICS_EXPORTER=otlp
            if pusher is not None:
                state.stops.append(functools.partial(otlp_metrics.stop, pusher))
        app.extensions["sigtrace"] = state
        _time_requests(app, self)
        if settings.tracing and self.tracer_provider is None:
            installed = _setup_exporter(app, settings, exporters)
            sdk = tracing.sdk_component()
            if sdk is not None:  # sigtrace's provider: this app is one of its users
                if not installed:
                    lifecycle.acquire(sdk)
                state.stops.append(functools.partial(lifecycle.release, sdk))
        _log_if_nothing_samples(settings, exporters, self.tracer_provider)
        if settings.metrics and settings.metrics_path:
            add_route(
                app,
                "SIGTRACE_METRICS_PATH",
                settings.metrics_path,
                _METRICS_ENDPOINT,
                self._metrics_view,
            )
        if settings.ui:
            self._serve_page(app, state)

    def _serve_page(self, app: flask.Flask, state: _AppState) -> None:
        """The signals page (SIGTRACE_UI) on the app and on the metrics port; slow
        sends are taken from the spans of the provider set up by now."""
        from . import ui

        settings = state.settings
        state.dashboard = ui.Dashboard(
            path=settings.ui_path,
            app_name=app.name,
            metrics=state.metrics,
            tracer_provider=self.tracer_provider,
            tracing_enabled=settings.tracing,
            slow_threshold=settings.slow_threshold,
            trace_url=settings.trace_url,
        )
        lifecycle.acquire(ui.COMPONENT)
        state.stops.append(functools.partial(lifecycle.release, ui.COMPONENT))
        for rule in (settings.ui_path, settings.ui_path + "/<path:subpath>"):
            add_route(app, "SIGTRACE_UI_PATH", rule, _UI_ENDPOINT, self._ui_view)
        if state.metrics_port is not None:
            from .exposition import serve_page

            serve_page(state.metrics_port, settings.metrics_addr, state.dashboard)

    def _refusal(self, state: _AppState) -> flask.Response | None:
        """The metrics routes' guard (/metrics and the UI): 401 without the bearer
        token when one is set, 403 when ``metrics_auth`` says no, else None."""
        request = flask.request
        token = state.settings.metrics_token
        if token is not None:
            from .exposition import bearer_token_matches

            if not bearer_token_matches(request.headers.get("Authorization", ""), token):
                return flask.Response("unauthorized\n", 401, {"WWW-Authenticate": "Bearer"})
        if self.metrics_auth is not None and not self.metrics_auth(request._get_current_object()):  # type: ignore[attr-defined]
            return flask.Response("forbidden\n", 403)
        return None

    def _metrics_view(self) -> flask.Response:
        state: _AppState = flask.current_app.extensions["sigtrace"]
        refused = self._refusal(state)
        if refused is not None:
            return refused
        request = flask.request
        from .exposition import render

        body, content_type = render(self.registry, request.headers.get("Accept", ""))
        return flask.Response(body, 200, {"Content-Type": content_type})

    def _ui_view(self, subpath: str = "") -> flask.Response:
        state: _AppState = flask.current_app.extensions["sigtrace"]
        refused = self._refusal(state)
        if refused is not None:
            return refused
        request = flask.request
        status, body, headers = state.dashboard.respond(
            "/" + subpath if subpath else "", request.script_root
        )
        return flask.Response(body, status, headers)

    def close(self) -> None:
        """Undo this extension's instrumentation (tests, app shutdown).

        Stops what :meth:`init_app` started: the last user of each (another
        app, ``BlinkerInstrumentor``) stops the thread, server or exporter,
        removes the request hooks and restores blinker's ``send``.
        """
        for app in self._apps:
            state = app.extensions.pop("sigtrace", None)
            if state is not None:
                state.stop()  # the last undo is dispatch.uninstrument()
        self._apps.clear()


def _log_if_nothing_samples(
    settings: Settings, exporters: tuple[str, ...], provider: trace.TracerProvider | None
) -> None:
    """One INFO line when no span can be sampled, so no exemplar either: why, and how to
    turn them on (metrics are recorded either way)."""
    if not settings.tracing:
        reason, fix = "SIGTRACE_TRACING is false", "set SIGTRACE_TRACING=true"
    elif provider is not None or tracing.user_configured_provider():
        return
    elif exporters == ("none",):
        reason, fix = "OTEL_TRACES_EXPORTER=none", "unset OTEL_TRACES_EXPORTER"
    elif tracing.sdk_disabled():
        reason, fix = "OTEL_SDK_DISABLED=true", "unset OTEL_SDK_DISABLED"
    elif exporters or tracing.otlp_endpoint_configured(settings.otlp_endpoint):
        reason = "the span exporter could not be set up (logged above)"
        fix = "fix the OTEL_EXPORTER_OTLP_* settings it names"
    else:
        reason = "no OTLP endpoint and no TracerProvider is configured"
        fix = (
            "set OTEL_EXPORTER_OTLP_ENDPOINT (or SIGTRACE_OTLP_ENDPOINT), pass "
            "SigTrace(tracer_provider=...), or set a global provider before init_app"
        )
    log.info(
        "sigtrace: no spans and no exemplars: %s; to get them, %s (metrics are recorded "
        "either way)",
        reason,
        fix,
    )


def _setup_exporter(app: flask.Flask, settings: Settings, exporters: tuple[str, ...]) -> bool:
    """OTEL_TRACES_EXPORTER when set; else OTLP when an endpoint is, else the console if asked.

    True when this call installed sigtrace's SDK provider.
    """
    provider = None
    if exporters:
        if "none" not in exporters:
            provider = tracing.setup_sdk(
                app.name,
                endpoint=settings.otlp_endpoint,
                console="console" in exporters,
                otlp="otlp" in exporters,
            )
    elif tracing.otlp_endpoint_configured(settings.otlp_endpoint):
        provider = tracing.setup_sdk(app.name, endpoint=settings.otlp_endpoint)
    elif settings.console_spans:
        provider = tracing.setup_sdk(app.name, console=True)
    return provider is not None
