"""The main job: the signup app under SigTrace, with traffic, /metrics and spans.

``python -m examples.demo`` (or ``make demo``) serves the app on 127.0.0.1,
drives a little traffic against itself, serves ``/metrics``, and sends spans
to OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, else prints them one line
per span on stdout.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

from werkzeug.serving import make_server

from examples.routes import pick_path
from examples.signup_app import create_app


def drive_traffic(base: str, rps: float, stop: threading.Event) -> None:
    """Request the demo's routes at about ``rps`` per second until ``stop``."""
    rng = random.Random()
    while not stop.wait(1.0 / rps):
        path = pick_path(rng)
        try:
            with urllib.request.urlopen(base + path, timeout=5) as response:
                response.read()
        except urllib.error.HTTPError:
            pass  # 404s and 500s are part of the story
        except OSError:
            if stop.is_set():
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--traffic-rps", type=float, default=5.0, help="0 disables traffic")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; 0 runs until ^C")
    args = parser.parse_args(argv)

    exporting = bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    app = create_app(SIGTRACE_CONSOLE_SPANS=not exporting)
    server = make_server(args.host, args.port, app, threaded=True)
    base = f"http://{args.host}:{server.server_port}"
    print(f"sigtrace demo listening on {base}", flush=True)
    print(f"  metrics:  {base}/metrics", flush=True)
    print(
        "  spans:    "
        + ("exported over OTLP" if exporting else "printed below, one [span] line each"),
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
    try:
        while not stop.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                stop.set()
    except KeyboardInterrupt:
        stop.set()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
