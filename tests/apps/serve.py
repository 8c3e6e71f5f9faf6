"""How the apps run as ``python -m tests.apps.<name>`` serve (see tests/app_process.py)."""

from __future__ import annotations

import signal
import threading
import typing as t

from flask import Flask
from werkzeug.serving import make_server


def serve(app: Flask) -> None:
    """Serve ``app`` on 127.0.0.1, a free port, printing ``listening on port N``
    (flushed) once it accepts requests; return once SIGTERM has stopped it."""
    server = make_server("127.0.0.1", 0, app, threaded=True)

    def stop(signum: int, frame: t.Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"listening on port {server.server_port}", flush=True)
    server.serve_forever(poll_interval=0.05)
    server.server_close()
