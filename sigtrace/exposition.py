"""Serving the metrics: content negotiation, multiprocess aggregation, a server.

All of it is prometheus-client's: ``choose_encoder`` picks Prometheus text or
OpenMetrics (which carries exemplars) from the Accept header,
``MultiProcessCollector`` merges the workers' files, ``start_http_server``
runs the separate exposition server.
"""

from __future__ import annotations

import threading
import typing as t

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .metrics import multiprocess_mode

__all__ = ["exposition_registry", "render", "start_server"]


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


_servers: dict[tuple[str, int], t.Any] = {}
_servers_lock = threading.Lock()


def start_server(port: int, addr: str, registry: CollectorRegistry | None) -> int:
    """Start (once per address) the exposition server; return its bound port."""
    with _servers_lock:
        if (addr, port) in _servers and port != 0:
            return port
        server, _thread = prometheus_client.start_http_server(
            port, addr=addr, registry=exposition_registry(registry)
        )
        bound = int(server.server_port)
        _servers[(addr, bound)] = server
        return bound
