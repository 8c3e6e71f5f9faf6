"""Serving the metrics: content negotiation, multiprocess aggregation, a server.

prometheus-client does the serving: ``choose_encoder`` picks Prometheus text
or OpenMetrics (which carries exemplars) from the Accept header, and its WSGI
app (``make_wsgi_app``) served by its threading WSGI server is the separate
exposition server (``SIGTRACE_METRICS_PORT``), which negotiates the format the
same way. That server is guarded like the app route: the bearer token
(``SIGTRACE_METRICS_TOKEN``, 401 without it) and ``metrics_auth`` (403). With
``SIGTRACE_UI`` on, it also serves the signals page under the same guard. With
``PROMETHEUS_MULTIPROC_DIR`` set, the exposed registry sums every worker's
sigtrace metrics (:class:`sigtrace.multiprocess_directory.PublishedTotalsCollector`,
which publishes the scraped worker's own values first) plus the app's own
prometheus-client multiprocess metrics (its ``MultiProcessCollector``).

Servers are kept per ``(addr, bound port)`` and reference-counted: asking
twice for a fixed port reuses the running server, port 0 always binds a new
one. A forked child (a gunicorn worker) inherits the table but not the
serving thread: it reuses its parent's fixed-port server, which keeps running
in the parent (see :mod:`sigtrace.gunicorn`), and never shuts it down.

The server drops a connection that sends nothing for :data:`CONNECTION_TIMEOUT`
seconds and serves at most :data:`MAX_CONNECTIONS` at once (a connection past
that is closed at once): idle or slow clients cannot use up the threads and
file descriptors of the process serving it (under gunicorn, the master).
"""

from __future__ import annotations

import errno
import hmac
import os
import re
import socket
import sys
import threading
import typing as t
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder
from prometheus_client.registry import Collector

from . import lifecycle, multiprocess_directory, multiprocess_publisher

if t.TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "ServerConflict",
    "bearer_token_matches",
    "exposition_registry",
    "published_totals",
    "negotiate",
    "render",
    "serve_page",
    "start_configured_server",
    "start_server",
    "stop_server",
]

Check = Callable[[t.Any], bool]
"""``metrics_auth``: gets the request (a ``flask.Request``), True lets it through."""

_STOP_TIMEOUT = 5.0  # seconds to wait for the serving thread after shutdown

CONNECTION_TIMEOUT = 10.0
"""Seconds the exposition server waits on a connection's socket (a read or a
write) before dropping it; Prometheus' default scrape timeout is 10 s too."""

MAX_CONNECTIONS = 64
"""Connections the exposition server serves at once, one thread each."""


def published_totals(path: str) -> multiprocess_directory.PublishedTotalsCollector:
    """Every worker's sigtrace metrics in ``path``, read as a scrape reads them (this
    process's values published first, and taken from memory in place of its file)."""
    return multiprocess_directory.PublishedTotalsCollector(
        path,
        before_read=multiprocess_publisher.publish_all,
        local=multiprocess_publisher.local_documents,
    )


def exposition_registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    """The registry to expose: all workers' in multiprocess mode, else ``registry``."""
    path = multiprocess_directory.directory()
    if path is not None:
        merged = CollectorRegistry()
        merged.register(published_totals(path))
        merged.register(_ClientFiles(path))
        return merged
    return prometheus_client.REGISTRY if registry is None else registry


class _ClientFiles(Collector):
    """prometheus-client's own multiprocess metrics (the app's ``.db`` files).

    Its collector raises on a removed directory or a bad file; here that is
    counted and the scrape goes on with sigtrace's metrics.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterable[t.Any]:
        from prometheus_client import multiprocess as client_multiprocess

        try:
            collector = client_multiprocess.MultiProcessCollector(None, self.path)  # type: ignore[no-untyped-call]
            families = list(collector.collect())  # type: ignore[no-untyped-call]
        except Exception as error:
            multiprocess_directory.report("client_files_failed", self.path, repr(error))
            return
        yield from families


def negotiate(accept: str | None) -> tuple[Callable[[t.Any], bytes], str]:
    """prometheus-client's encoder and content type for an ``Accept`` header; the
    Prometheus text format for one it cannot read (recent versions raise on some
    malformed ones, e.g. ``version=banana``, older ones ignore the version), as for
    a format it does not know."""
    if accept and _unreadable_openmetrics_version(accept):
        return choose_encoder("")
    try:
        return choose_encoder(accept or "")
    except Exception:
        return choose_encoder("")


def _chosen(accept: str) -> str | None:
    """The content type prometheus-client itself picks for ``accept`` (None: it raises)."""
    try:
        return choose_encoder(accept)[1]
    except Exception:
        return None


_VERSION = re.compile(r"[0-9]+(\.[0-9]+)*")


def _unreadable_openmetrics_version(accept: str) -> bool:
    """An OpenMetrics media range whose ``version`` is not a dotted number. Written
    here because prometheus-client's own check differs between its versions."""
    for media_range in accept.split(","):
        media_type, *parameters = media_range.split(";")
        if media_type.strip().lower() != "application/openmetrics-text":
            continue
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "version" and not _VERSION.fullmatch(value.strip()):
                return True
    return False


def render(registry: CollectorRegistry | None, accept: str) -> tuple[bytes, str]:
    """The exposition body and its content type for an ``Accept`` header."""
    encoder, content_type = negotiate(accept)
    return encoder(exposition_registry(registry)), content_type


def bearer_token_matches(authorization: str, token: str) -> bool:
    """``Authorization: Bearer <token>``, the scheme name in any case (RFC 7235)."""
    scheme, _, given = authorization.strip().partition(" ")
    # compare_digest: the time taken does not tell how much of the token matched
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


class ServerConflict(ValueError):
    """A running server on that port is guarded differently than asked."""


class _QuietHandler(WSGIRequestHandler):
    """wsgiref's handler without its line per request on stderr, with a socket
    timeout (``StreamRequestHandler.timeout``)."""

    timeout = CONNECTION_TIMEOUT

    def log_message(self, format: str, *args: t.Any) -> None:
        return None


class _BoundedServer(ThreadingWSGIServer):
    """prometheus-client's threading WSGI server, at most :data:`MAX_CONNECTIONS`
    connections at once, quiet about clients that time out or go away.

    Written here because neither prometheus-client's server nor socketserver
    bounds its threads.
    """

    request_queue_size = 128  # the listen backlog (socketserver's 5 drops bursts of connects)

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().server_activate()

    def process_request(self, request: t.Any, client_address: t.Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the limit: closed at once
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread started
            raise

    def process_request_thread(self, request: t.Any, client_address: t.Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: t.Any, client_address: t.Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # a timeout, a reset: the client's
            return
        super().handle_error(request, client_address)


class Page(t.Protocol):
    """The signals page (:class:`sigtrace.ui.Dashboard`) as the server needs it."""

    path: str

    def respond(
        self, subpath: str, script_root: str
    ) -> tuple[int, bytes, list[tuple[str, str]]]: ...


def _guarded_app(
    registry: CollectorRegistry, token: str | None, check: Check | None, server: _Server | None
) -> Callable[[dict[str, t.Any], t.Any], Iterable[bytes]]:
    """prometheus-client's WSGI app behind the token and ``metrics_auth``, and the
    signals page of ``server.ui`` at its path when there is one."""
    serve = prometheus_client.make_wsgi_app(registry)

    def app(environ: dict[str, t.Any], start_response: t.Any) -> Iterable[bytes]:
        if token is not None and not bearer_token_matches(
            environ.get("HTTP_AUTHORIZATION", ""), token
        ):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")],
            )
            return [b"unauthorized\n"]
        if check is not None:
            import flask

            if not check(flask.Request(environ)):
                start_response("403 Forbidden", [("Content-Type", "text/plain")])
                return [b"forbidden\n"]
        accept = environ.get("HTTP_ACCEPT") or ""
        if _unreadable_openmetrics_version(accept) or _chosen(accept) is None:
            environ["HTTP_ACCEPT"] = ""  # unreadable: the text format, as negotiate() says
        page = server.ui if server is not None else None
        path = environ.get("PATH_INFO", "")
        if page is not None and (path == page.path or path.startswith(page.path + "/")):
            status, body, headers = page.respond(
                path[len(page.path) :], environ.get("SCRIPT_NAME", "")
            )
            start_response(f"{status} {'OK' if status == 200 else 'Not Found'}", headers)
            return [body]
        return t.cast(Iterable[bytes], serve(environ, start_response))

    return app


def _bind(
    port: int,
    addr: str,
    registry: CollectorRegistry,
    token: str | None,
    check: Check | None,
    holder: _Server,
) -> t.Any:
    """What ``prometheus_client.start_http_server`` does, with a guarded app
    (it takes no app of ours): its threading WSGI server, IPv6 when ``addr`` is."""
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]

    class Server(_BoundedServer):
        address_family = family

    return make_server(
        addr,
        port,
        _guarded_app(registry, token, check, holder),
        Server,
        handler_class=_QuietHandler,
    )


class _Server:
    """A bound exposition server, how it is guarded, and its process.

    Its :attr:`component` (run by :mod:`sigtrace.lifecycle`, which counts its
    users) serves it on a ``sigtrace-metrics`` thread. In a forked child it is
    the parent's: the child may reuse it (counted) but never shuts it down.
    """

    component: lifecycle.Component
    """Serves :attr:`server` while acquired (set by :meth:`bind`)."""

    def __init__(self, token: str | None, check: Check | None, ui: Page | None) -> None:
        self.server: t.Any = None
        self.token = token
        self.check = check
        self.ui = ui
        """The signals page served at its path, if SIGTRACE_UI is on (the first app's)."""
        self.pid = os.getpid()
        self.thread: threading.Thread | None = None

    def bind(self, server: t.Any) -> None:
        """Take the bound ``server``; its :attr:`component` serves it once acquired."""
        self.server = server
        self.component = lifecycle.Component(
            f"sigtrace-metrics {server.server_address[0]}:{server.server_port}",
            lifecycle.Order.SERVER,
            start=self._start,
            stop=self._stop,
        )

    def _start(self) -> None:
        self.thread = lifecycle.spawn("sigtrace-metrics", self.server.serve_forever)

    def _stop(self) -> None:
        """Close the socket and join the serving thread.

        A server inherited across fork is only forgotten: its thread runs in
        the parent, and ``shutdown()`` here would wait forever for a loop that
        is not running.
        """
        if self.pid != os.getpid():
            self.server.socket.close()  # this process's copy of the fd only
            return
        self.server.shutdown()
        self.server.server_close()
        if self.thread is not None:
            self.thread.join(_STOP_TIMEOUT)


_servers: dict[tuple[str, int], _Server] = {}
_servers_lock = lifecycle.ForkSafeLock()


def start_server(
    port: int,
    addr: str,
    registry: CollectorRegistry | None,
    *,
    token: str | None = None,
    check: Check | None = None,
    ui: Page | None = None,
) -> int:
    """Start the exposition server on ``addr:port`` (0: any free port); return
    the bound port. With ``token`` it answers 401 without ``Authorization:
    Bearer <token>``; with ``check`` 403 when ``check(request)`` is false.
    With ``ui`` it serves that signals page at its path, guarded the same way
    (a running server without a page takes the first one it is given).

    A fixed port already served (by this process or the parent it was forked
    from) is reused and counted, not bound again; it must be guarded by the
    same token, and cannot take a ``check`` it was not started with (a server
    started by the gunicorn master has none): :class:`ServerConflict` says so.
    Raises :class:`OSError` when the address cannot be bound.
    """
    with _servers_lock:
        running = _servers.get((addr, port)) if port != 0 else None
        if running is not None:
            if running.token != token:
                raise ServerConflict(
                    f"the metrics server already running on {addr}:{port} was started "
                    "with a different SIGTRACE_METRICS_TOKEN (under gunicorn the master "
                    "reads it from the environment: set it there, not in app.config)"
                )
            if check is not None and running.check is not check:
                raise ServerConflict(
                    f"the metrics server already running on {addr}:{port} (started "
                    + (
                        "by the parent process, e.g. the gunicorn master"
                        if running.pid != os.getpid()
                        else "by another app"
                    )
                    + ") cannot apply this app's metrics_auth; guard it with "
                    "SIGTRACE_METRICS_TOKEN instead"
                )
            lifecycle.acquire(running.component)
            if running.ui is None:
                running.ui = ui
            return port
        running = _Server(token, check, ui)
        running.bind(_bind(port, addr, exposition_registry(registry), token, check, running))
        lifecycle.acquire(running.component)  # serves it
        bound = int(running.server.server_port)
        _servers[(addr, bound)] = running
        return bound


def serve_page(port: int, addr: str, ui: Page) -> None:
    """Serve ``ui`` on the running server of ``addr:port`` too, unless it has a page."""
    with _servers_lock:
        running = _servers.get((addr, port))
        if running is not None and running.ui is None:
            running.ui = ui


def stop_server(port: int, addr: str) -> None:
    """Release one :func:`start_server` of ``addr:port``; the last one stops it
    (in the process that started it; a forked child only closes its copy of
    the socket)."""
    with _servers_lock:
        running = _servers.get((addr, port))
        if running is not None and lifecycle.release(running.component):
            del _servers[(addr, port)]


def start_configured_server(
    settings: Settings,
    registry: CollectorRegistry | None,
    check: Check | None = None,
    *,
    gunicorn_master: bool = False,
    ui: Page | None = None,
) -> int:
    """:func:`start_server` on ``SIGTRACE_METRICS_PORT`` / ``SIGTRACE_METRICS_ADDR``,
    guarded by ``SIGTRACE_METRICS_TOKEN`` and ``check``: a failure is a
    :class:`~sigtrace.config.ConfigError` that names the setting at fault and a
    fix that applies where this process runs (a gunicorn worker is told to serve
    it from the master; ``gunicorn_master``: this is the master)."""
    from .config import ConfigError

    port, addr = t.cast(int, settings.metrics_port), settings.metrics_addr
    try:
        return start_server(port, addr, registry, token=settings.metrics_token, check=check, ui=ui)
    except ServerConflict as error:
        raise ConfigError(f"SIGTRACE_METRICS_PORT={port!r}: {error}") from None
    except OSError as error:
        in_worker = "gunicorn" in sys.modules and not gunicorn_master
        raise ConfigError(_bind_error(port, addr, error, in_worker)) from error


def _bind_error(port: int, addr: str, error: OSError, gunicorn_worker: bool) -> str:
    where = f"cannot serve metrics on {addr}:{port} ({error})"
    if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        return (
            f"SIGTRACE_METRICS_ADDR={addr!r}: {where}: not an address of this host; set it "
            "to 127.0.0.1 (this host only), or to an address of one of its interfaces "
            "(0.0.0.0 for all of them, then with SIGTRACE_METRICS_TOKEN)"
        )
    if error.errno == errno.EACCES and 0 < port < 1024:
        return (
            f"SIGTRACE_METRICS_PORT={port!r}: {where}: ports below 1024 need privileges; "
            "choose a port of 1024 or more"
        )
    if error.errno == errno.EADDRINUSE and gunicorn_worker:
        return (
            f"SIGTRACE_METRICS_PORT={port!r}: {where}: under gunicorn every worker would "
            "bind it; serve it once from the master: add `from sigtrace.gunicorn import "
            "when_ready` to gunicorn.conf.py and set PROMETHEUS_MULTIPROC_DIR"
        )
    if error.errno == errno.EADDRINUSE:
        return (
            f"SIGTRACE_METRICS_PORT={port!r}: {where}: another process listens there; "
            "choose a free port"
        )
    return f"SIGTRACE_METRICS_PORT={port!r}, SIGTRACE_METRICS_ADDR={addr!r}: {where}"
