"""A real OTLP traces and metrics receiver for tests: gRPC and HTTP/protobuf on 127.0.0.1.

No collector can be installed here, so tests run this one in process. Both
servers decode ``ExportTraceServiceRequest`` and ``ExportMetricsServiceRequest``
with the ``opentelemetry-proto`` messages, flatten every span with its resource
attributes into a :class:`ReceivedSpan` and every metric data point into a
:class:`ReceivedPoint`, and keep the request headers (gRPC metadata or HTTP
headers), all behind one lock; tests block on :meth:`Receiver.wait_for` and
:meth:`Receiver.wait_for_points`.

Use :func:`running_receiver` (a context manager that always stops the server);
test modules wrap it in their own fixtures.
"""

from __future__ import annotations

import gzip
import http.server
import threading
import time
import typing as t
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

__all__ = [
    "PROTOCOLS",
    "ReceivedPoint",
    "ReceivedSpan",
    "Receiver",
    "free_port",
    "running_receiver",
]

PROTOCOLS = ("grpc", "http/protobuf")

SPAN_KINDS = {value: name.removeprefix("SPAN_KIND_") for name, value in Span.SpanKind.items()}
STATUS_CODES = {
    value: name.removeprefix("STATUS_CODE_") for name, value in Status.StatusCode.items()
}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived, ids in lowercase hex (parent "" for roots)."""

    name: str
    kind: str  # "SERVER", "INTERNAL", ...
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, t.Any]
    status: str  # "UNSET", "OK", "ERROR"
    events: tuple[tuple[str, dict[str, t.Any]], ...]
    resource: dict[str, t.Any]
    start_ns: int
    end_ns: int
    scope: str = ""  # the instrumentation scope (tracer) name


def _value(value: AnyValue) -> t.Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(pairs: t.Iterable[KeyValue]) -> dict[str, t.Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        kind=SPAN_KINDS.get(span.kind, str(span.kind)),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes=_attributes(span.attributes),
                        status=STATUS_CODES.get(span.status.code, str(span.status.code)),
                        events=tuple((e.name, _attributes(e.attributes)) for e in span.events),
                        resource=resource,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        scope=scope_spans.scope.name,
                    )
                )
    return spans


@dataclass(frozen=True)
class ReceivedExemplar:
    value: float
    trace_id: str  # "" when the exemplar has none in its own field
    span_id: str
    attributes: dict[str, t.Any]


@dataclass(frozen=True)
class ReceivedPoint:
    """One metric data point as it arrived, with its metric's name, unit and type."""

    name: str
    description: str
    unit: str
    kind: str  # "sum", "histogram", "gauge", ...
    temporality: str  # "CUMULATIVE", "DELTA", "" for gauges
    monotonic: bool
    attributes: dict[str, t.Any]
    value: float  # sums and gauges
    count: int  # histograms
    sum: float
    bucket_counts: tuple[int, ...]
    explicit_bounds: tuple[float, ...]
    has_min_max: bool
    exemplars: tuple[ReceivedExemplar, ...]
    start_ns: int
    time_ns: int
    resource: dict[str, t.Any]
    scope: str


TEMPORALITIES = {
    value: name.removeprefix("AGGREGATION_TEMPORALITY_")
    for name, value in AggregationTemporality.items()
}


def _exemplar(exemplar: t.Any) -> ReceivedExemplar:
    which = exemplar.WhichOneof("value")
    return ReceivedExemplar(
        value=float(getattr(exemplar, which)) if which else 0.0,
        trace_id=exemplar.trace_id.hex(),
        span_id=exemplar.span_id.hex(),
        attributes=_attributes(exemplar.filtered_attributes),
    )


def _flatten_metrics(
    request: metrics_service_pb2.ExportMetricsServiceRequest,
) -> list[ReceivedPoint]:
    points = []
    for resource_metrics in request.resource_metrics:
        resource = _attributes(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data") or ""
                data = getattr(metric, kind) if kind else None
                temporality = TEMPORALITIES.get(getattr(data, "aggregation_temporality", 0), "")
                for point in getattr(data, "data_points", ()):
                    number = point.WhichOneof("value") if kind in ("sum", "gauge") else None
                    histogram = kind == "histogram"
                    points.append(
                        ReceivedPoint(
                            name=metric.name,
                            description=metric.description,
                            unit=metric.unit,
                            kind=kind,
                            temporality=temporality if kind != "gauge" else "",
                            monotonic=bool(getattr(data, "is_monotonic", False)),
                            attributes=_attributes(point.attributes),
                            value=float(getattr(point, number)) if number else 0.0,
                            count=int(point.count) if histogram else 0,
                            sum=float(point.sum) if histogram else 0.0,
                            bucket_counts=tuple(point.bucket_counts) if histogram else (),
                            explicit_bounds=tuple(point.explicit_bounds) if histogram else (),
                            has_min_max=histogram
                            and (point.HasField("min") or point.HasField("max")),
                            exemplars=tuple(_exemplar(e) for e in point.exemplars),
                            start_ns=point.start_time_unix_nano,
                            time_ns=point.time_unix_nano,
                            resource=resource,
                            scope=scope_metrics.scope.name,
                        )
                    )
    return points


T = t.TypeVar("T")


class Receiver:
    """What one server received; thread-safe. Subclasses run the transport."""

    protocol: str

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self._headers: list[dict[str, str]] = []
        self._points: list[ReceivedPoint] = []
        self._metric_headers: list[dict[str, str]] = []
        self.port = 0

    @property
    def endpoint(self) -> str:
        """The base URL a client puts in ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    def record(
        self, request: trace_service_pb2.ExportTraceServiceRequest, headers: dict[str, str]
    ) -> None:
        spans = _flatten(request)
        with self._changed:
            self._spans.extend(spans)
            self._headers.append(headers)
            self._changed.notify_all()

    def record_metrics(
        self, request: metrics_service_pb2.ExportMetricsServiceRequest, headers: dict[str, str]
    ) -> None:
        points = _flatten_metrics(request)
        with self._changed:
            self._points.extend(points)
            self._metric_headers.append(headers)
            self._changed.notify_all()

    @property
    def points(self) -> list[ReceivedPoint]:
        """Every metric data point received, in arrival order (exports are cumulative)."""
        with self._changed:
            return list(self._points)

    @property
    def metric_headers(self) -> list[dict[str, str]]:
        """Headers (lowercase names) of every metrics export request."""
        with self._changed:
            return [dict(h) for h in self._metric_headers]

    def wait_for_points(
        self,
        predicate: Callable[[list[ReceivedPoint]], T],
        timeout: float = 10.0,
        what: str = "metric points",
    ) -> T:
        """Block until ``predicate(points)`` is truthy and return its value."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = predicate(list(self._points))
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({p.name for p in self._points})
                    raise AssertionError(
                        f"{self.protocol} receiver: no {what} after {timeout:.1f}s; "
                        f"{len(self._points)} points arrived: {names}"
                    )
                self._changed.wait(remaining)

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    @property
    def headers(self) -> list[dict[str, str]]:
        """Headers (lowercase names) of every export request, in arrival order."""
        with self._changed:
            return [dict(h) for h in self._headers]

    def wait_for(
        self,
        predicate: Callable[[list[ReceivedSpan]], T],
        timeout: float = 10.0,
        what: str = "spans",
    ) -> T:
        """Block until ``predicate(spans)`` is truthy and return its value.

        Fails the test with what arrived so far after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = predicate(list(self._spans))
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({s.name for s in self._spans})
                    raise AssertionError(
                        f"{self.protocol} receiver: no {what} after {timeout:.1f}s; "
                        f"{len(self._spans)} spans arrived: {names}"
                    )
                self._changed.wait(remaining)

    def start(self, port: int = 0) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def Export(  # the generated service's method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        metadata = {str(k).lower(): str(v) for k, v in context.invocation_metadata()}
        self._receiver.record(request, metadata)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def Export(  # the generated service's method name
        self,
        request: metrics_service_pb2.ExportMetricsServiceRequest,
        context: grpc.ServicerContext,
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        metadata = {str(k).lower(): str(v) for k, v in context.invocation_metadata()}
        self._receiver.record_metrics(request, metadata)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class GrpcReceiver(Receiver):
    """OTLP's ``TraceService`` and ``MetricsService`` over insecure gRPC."""

    protocol = "grpc"

    def __init__(self) -> None:
        super().__init__()
        self._server: grpc.Server | None = None

    def start(self, port: int = 0) -> None:
        # so_reuseport off: a second server must not silently share a chosen port
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-grpc"),
            options=[("grpc.so_reuseport", 0)],
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(self), server)
        self.port = server.add_insecure_port(f"127.0.0.1:{port}")
        if not self.port:
            raise OSError(f"grpc receiver could not bind 127.0.0.1:{port}")
        server.start()
        self._server = server

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=None).wait(timeout=5)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver


class _TracesHandler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # http.server's naming
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path not in ("/v1/traces", "/v1/metrics"):
            self._reply(404, b"")
            return
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        headers = {k.lower(): v for k, v in self.headers.items()}
        if self.path == "/v1/metrics":
            metrics_request = metrics_service_pb2.ExportMetricsServiceRequest()
            try:
                metrics_request.ParseFromString(body)
            except Exception:
                self._reply(400, b"")
                return
            self.server.receiver.record_metrics(metrics_request, headers)
            response = metrics_service_pb2.ExportMetricsServiceResponse()
            self._reply(200, response.SerializeToString())
            return
        request = trace_service_pb2.ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception:
            self._reply(400, b"")
            return
        self.server.receiver.record(request, headers)
        self._reply(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: t.Any) -> None:
        return None  # keep test output clean


class HttpReceiver(Receiver):
    """``POST /v1/traces`` and ``/v1/metrics`` with a protobuf body (optionally gzip/deflate)."""

    protocol = "http/protobuf"

    def __init__(self) -> None:
        super().__init__()
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, port: int = 0) -> None:
        server = _HTTPServer(("127.0.0.1", port), _TracesHandler)
        server.receiver = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="otlp-http"
        )
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def new_receiver(protocol: str) -> Receiver:
    if protocol == "grpc":
        return GrpcReceiver()
    if protocol == "http/protobuf":
        return HttpReceiver()
    raise ValueError(f"unknown OTLP protocol {protocol!r}")


@contextmanager
def running_receiver(protocol: str, port: int = 0) -> Iterator[Receiver]:
    """A started receiver for ``protocol`` on 127.0.0.1:``port`` (0: any free port)."""
    receiver = new_receiver(protocol)
    receiver.start(port)
    try:
        yield receiver
    finally:
        receiver.stop()


def free_port() -> int:
    """A port nothing listens on right now (bound to 0, then released)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
