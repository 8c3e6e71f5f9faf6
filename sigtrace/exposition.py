"""Serving the metrics: content negotiation, multiprocess aggregation, a server.

All of it is prometheus-client's: ``choose_encoder`` picks Prometheus text or
OpenMetrics (which carries exemplars) from the Accept header,
``MultiProcessCollector`` merges the workers' files, ``start_http_server``
runs the separate exposition server (``SIGTRACE_METRICS_PORT``), which
negotiates the format the same way.

Servers are kept per ``(addr, bound port)`` and reference-counted: asking
twice for a fixed port reuses the running server, port 0 always binds a new
one. A forked child (a gunicorn worker) inherits the table but not the
serving thread: it reuses its parent's fixed-port server, which keeps running
in the parent (see :mod:`sigtrace.gunicorn`), and never shuts it down.
"""

from __future__ import annotations

import os
import threading
import typing as t

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .metrics import multiprocess_mode

__all__ = ["exposition_registry", "render", "start_server", "stop_server"]

_STOP_TIMEOUT = 5.0  # seconds to wait for the serving thread after shutdown


def exposition_registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    """The registry to expose: all workers' in multiprocess mode, else ``registry``."""
    if multiprocess_mode():
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged
    return prometheus_client.REGISTRY if registry is None else registry


def render(registry: CollectorRegistry | None, accept: str) -> tuple[bytes, str]:
    """The exposition body and its content type for an ``Accept`` header."""
    encoder, content_type = choose_encoder(accept)
    return encoder(exposition_registry(registry)), content_type


class _Server:
    """A running exposition server, the process that runs it, and its users."""

    def __init__(self, server: t.Any, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread
        self.pid = os.getpid()
        self.users = 1


_servers: dict[tuple[str, int], _Server] = {}
_servers_lock = threading.Lock()


def start_server(port: int, addr: str, registry: CollectorRegistry | None) -> int:
    """Start the exposition server on ``addr:port`` (0: any free port); return
    the bound port.

    A fixed port already served (by this process or the parent it was forked
    from) is reused and counted, not bound again. Raises :class:`OSError` when
    the address cannot be bound.
    """
    with _servers_lock:
        running = _servers.get((addr, port)) if port != 0 else None
        if running is not None:
            running.users += 1
            return port
        server, thread = prometheus_client.start_http_server(
            port, addr=addr, registry=exposition_registry(registry)
        )
        bound = int(server.server_port)
        _servers[(addr, bound)] = _Server(server, thread)
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
    running.thread.join(_STOP_TIMEOUT)
