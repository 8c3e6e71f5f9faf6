"""The main job: the signup app under SigTrace, with traffic, /metrics and span trees.

``python -m examples.demo`` (or ``make demo``) serves the app on 127.0.0.1,
drives a little traffic against itself and serves ``/metrics`` and the signals
page (``SIGTRACE_UI``) at ``/sigtrace``. For each
request it traces it prints the span tree with durations (the slowest receiver
of each send marked), and every few seconds a short table of the slowest
receivers (calls, p50, p99, errors) read from the metrics. ``--raw-spans``
prints one line per span instead of the trees. With ``OTEL_EXPORTER_OTLP_ENDPOINT``
set, spans also go over OTLP. The access log is off; an unhandled exception is
one ``[error]`` line (its trace is in the tree above it).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
import typing as t
import urllib.error
import urllib.request

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from prometheus_client import REGISTRY
from werkzeug.serving import make_server

from examples.routes import pick_path
from examples.signup_app import create_app
from examples.span_tree import SpanTreePrinter, render_receivers, slowest_receivers
from sigtrace import tracing
from sigtrace.console import format_span

DEFAULT_PORT = 8000


def drive_traffic(base: str, rps: float, stop: threading.Event) -> None:
    """Request the demo's routes at about ``rps`` per second until ``stop``."""
    rng = random.Random()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while not stop.wait(1.0 / rps):
        path = pick_path(rng)
        try:
            with opener.open(base + path, timeout=5) as response:
                response.read()
        except urllib.error.HTTPError:
            pass  # 404s and 500s are part of the story
        except OSError:
            if stop.is_set():
                return


class _RawSpans(SpanProcessor):
    """A span processor printing sigtrace's one-line form of each span as it ends."""

    def __init__(self, write: t.Callable[[str], None]) -> None:
        self._write = write

    def on_start(self, span: t.Any, parent_context: t.Any = None) -> None:
        return None

    def on_end(self, span: t.Any) -> None:
        self._write(format_span(span))

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _OneLineErrors(logging.Formatter):
    """``[error] Exception on /boom [GET]: ZeroDivisionError``, without the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        kind = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        return f"[error] {record.getMessage()}" + (f": {kind}" if kind else "")


def _printer() -> t.Callable[[str], None]:
    lock = threading.Lock()

    def write(text: str) -> None:
        with lock:
            sys.stdout.write(text)
            sys.stdout.flush()

    return write


def _tracer_provider(exporting: bool) -> TracerProvider:
    """The global provider: sigtrace's OTLP set-up when an endpoint is configured, else a
    plain SDK provider (the demo prints spans itself)."""
    provider = tracing.setup_sdk("signup-demo") if exporting else None
    if provider is None:
        provider = TracerProvider(resource=tracing.sdk_resource("signup-demo"))
        trace.set_tracer_provider(provider)
    return t.cast(TracerProvider, provider)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free one"
    )
    parser.add_argument("--traffic-rps", type=float, default=5.0, help="0 disables traffic")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; 0 runs until ^C")
    parser.add_argument(
        "--table-every", type=float, default=5.0, help="seconds between receiver tables; 0: none"
    )
    parser.add_argument(
        "--raw-spans", action="store_true", help="one line per span instead of span trees"
    )
    parser.add_argument(
        "--spans",
        choices=tracing.SPAN_MODES,
        help="SIGTRACE_SPANS for the demo (default: the environment's, else all); "
        "slow keeps the spans of slow or failing calls only",
    )
    args = parser.parse_args(argv)
    if args.spans is not None:
        os.environ["SIGTRACE_SPANS"] = args.spans  # read by SigTrace in create_app()

    write = _printer()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log
    exporting = tracing.otlp_endpoint_configured()
    provider = _tracer_provider(exporting)
    processor = _RawSpans(write) if args.raw_spans else SpanTreePrinter(write)
    provider.add_span_processor(processor)  # printed as each span ends
    app = create_app(SIGTRACE_UI=True)  # the signals page at /sigtrace
    errors = logging.StreamHandler(sys.stdout)
    errors.setFormatter(_OneLineErrors())
    app.logger.handlers[:] = [errors]
    app.logger.propagate = False

    # Bound here, not by werkzeug: on a busy port werkzeug prints its own advice and exits.
    listener = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((args.host, args.port))
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            other = args.port + 1
            print(
                f"sigtrace demo: port {args.port} on {args.host} is busy; choose another with "
                f"`make demo PORT={other}` (or `--port {other}`; 0 picks a free one)",
                file=sys.stderr,
            )
            return 2
        raise
    listener.listen(128)
    server = make_server(args.host, args.port, app, threaded=True, fd=listener.fileno())
    base = f"http://{args.host}:{listener.getsockname()[1]}"
    print(f"sigtrace demo listening on {base}", flush=True)
    print(f"  metrics:  {base}/metrics", flush=True)
    print(f"  page:     {base}/sigtrace  (signal map, receivers, slow sends)", flush=True)
    shown = "one line per span" if args.raw_spans else "one span tree per request"
    print(
        f"  spans:    printed below, {shown}" + (", and exported over OTLP" if exporting else ""),
        flush=True,
    )
    print("  signals:  FLASK_APP=examples.wsgi flask sigtrace signals", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    if args.traffic_rps > 0:
        threading.Thread(
            target=drive_traffic, args=(base, args.traffic_rps, stop), daemon=True
        ).start()
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    next_table = time.monotonic() + args.table_every if args.table_every > 0 else None
    try:
        while not stop.wait(0.2):
            now = time.monotonic()
            if next_table is not None and now >= next_table:
                write("\n" + render_receivers(slowest_receivers(REGISTRY)) + "\n\n")
                next_table = now + args.table_every
            if deadline is not None and now >= deadline:
                stop.set()
    except KeyboardInterrupt:
        stop.set()
    server.shutdown()
    if args.table_every > 0:
        write("\n" + render_receivers(slowest_receivers(REGISTRY)) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OTEL_SERVICE_NAME", "signup-demo")
    sys.exit(main())
