"""Serving the metrics: content negotiation, multiprocess aggregation, a server.

prometheus-client does the serving: ``choose_encoder`` picks Prometheus text
or OpenMetrics (which carries exemplars) from the Accept header, and its WSGI
app (``make_wsgi_app``) served by its threading WSGI server is the separate
exposition server (``SIGTRACE_METRICS_PORT``), which negotiates the format the
same way. That server is guarded like the app route: the bearer token
(``SIGTRACE_METRICS_TOKEN``, 401 without it) and ``metrics_auth`` (403). With
``SIGTRACE_UI`` on, it also serves the signals page under the same guard. With
``PROMETHEUS_MULTIPROC_DIR`` set, the exposed registry sums every worker's
sigtrace metrics (:class:`sigtrace.multiprocess.MultiprocessCollector`, which
publishes the scraped worker's own values first) plus the app's own
prometheus-client multiprocess metrics (its ``MultiProcessCollector``).

Servers are kept per ``(addr, bound port)`` and reference-counted: asking
twice for a fixed port reuses the running server, port 0 always binds a new
one. A forked child (a gunicorn worker) inherits the table but not the
serving thread: it reuses its parent's fixed-port server, which keeps running
in the parent (see :mod:`sigtrace.gunicorn`), and never shuts it down.
"""

from __future__ import annotations

import hmac
import os
import socket
import threading
import typing as t
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder

from . import multiprocess

__all__ = [
    "ServerConflict",
    "bearer_token_matches",
    "exposition_registry",
    "render",
    "start_server",
    "stop_server",
]

Check = Callable[[t.Any], bool]
"""``metrics_auth``: gets the request (a ``flask.Request``), True lets it through."""

_STOP_TIMEOUT = 5.0  # seconds to wait for the serving thread after shutdown


def exposition_registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    """The registry to expose: all workers' in multiprocess mode, else ``registry``."""
    path = multiprocess.directory()
    if path is not None:
        from prometheus_client import multiprocess as client_multiprocess

        merged = CollectorRegistry()
        merged.register(multiprocess.MultiprocessCollector(path))
        client_multiprocess.MultiProcessCollector(merged, path)  # type: ignore[no-untyped-call]
        return merged
    return prometheus_client.REGISTRY if registry is None else registry


def render(registry: CollectorRegistry | None, accept: str) -> tuple[bytes, str]:
    """The exposition body and its content type for an ``Accept`` header."""
    encoder, content_type = choose_encoder(accept)
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
    """wsgiref's handler without its line per request on stderr."""

    def log_message(self, format: str, *args: t.Any) -> None:
        return None


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


def _serve(
    port: int,
    addr: str,
    registry: CollectorRegistry,
    token: str | None,
    check: Check | None,
    holder: _Server,
) -> tuple[t.Any, threading.Thread]:
    """What ``prometheus_client.start_http_server`` does, with a guarded app
    (it takes no app of ours): its threading WSGI server, IPv6 when ``addr`` is."""
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(
        addr,
        port,
        _guarded_app(registry, token, check, holder),
        Server,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(target=server.serve_forever, name="sigtrace-metrics", daemon=True)
    thread.start()
    return server, thread


class _Server:
    """A running exposition server, how it is guarded, its process and its users."""

    def __init__(self, token: str | None, check: Check | None, ui: Page | None) -> None:
        self.server: t.Any = None
        self.thread: threading.Thread | None = None
        self.token = token
        self.check = check
        self.ui = ui
        """The signals page served at its path, if SIGTRACE_UI is on (the first app's)."""
        self.pid = os.getpid()
        self.users = 1


_servers: dict[tuple[str, int], _Server] = {}
_servers_lock = threading.Lock()


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
            running.users += 1
            if running.ui is None:
                running.ui = ui
            return port
        holder = _Server(token, check, ui)
        holder.server, holder.thread = _serve(
            port, addr, exposition_registry(registry), token, check, holder
        )
        bound = int(holder.server.server_port)
        _servers[(addr, bound)] = holder
        return bound


def stop_server(port: int, addr: str) -> None:
    """Release one :func:`start_server` of ``addr:port``; the last one stops it.

    Stopping closes the socket and joins the serving thread. A server inherited
    across fork is only forgotten: its thread runs in the parent, and
    ``shutdown()`` here would wait forever for a loop that is not running.
    """
    with _servers_lock:
        running = _servers.get((addr, port))
        if running is None:
            return
        running.users -= 1
        if running.users > 0:
            return
        del _servers[(addr, port)]
    if running.pid != os.getpid():
        running.server.socket.close()  # this process's copy of the fd only
        return
    running.server.shutdown()
    running.server.server_close()
    if running.thread is not None:
        running.thread.join(_STOP_TIMEOUT)
