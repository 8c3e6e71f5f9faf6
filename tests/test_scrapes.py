"""What a scrape of ``/metrics`` counts: it is no timed request, but its
``request-started`` / ``request-finished`` sends are counted like every send of
those signals (the README's choice). Scraped over real HTTP on 127.0.0.1.

So ``sigtrace_signal_sends_total{signal="request-started"}`` counts every
request Flask handled, scrapes and ``SIGTRACE_EXCLUDED_PATHS`` included, while
``sigtrace_http_request_duration_seconds_count`` counts the timed requests
only: request rates on the dashboards and in the rules are read from the latter.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry
from werkzeug.serving import make_server

from sigtrace import SigTrace
from tests.conftest import samples_from_text

SCRAPES = 3


@pytest.fixture
def served(registry: CollectorRegistry) -> Iterator[str]:
    app = Flask("scrapes")
    app.config.update(SIGTRACE_TRACING=False, SIGTRACE_EXCLUDED_PATHS=["/health"])

    @app.get("/ping")
    def ping() -> str:
        return "pong"

    @app.get("/health")
    def health() -> str:
        return "ok"

    ext = SigTrace(app, registry=registry)
    server = make_server("127.0.0.1", 0, app, threaded=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)
        ext.close()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return str(response.read().decode("utf-8"))


def test_a_scrape_counts_its_request_signal_sends_but_is_not_timed(served: str) -> None:
    get(f"{served}/ping")
    get(f"{served}/health")
    for _ in range(SCRAPES):
        text = get(f"{served}/metrics")
    samples = samples_from_text(text)

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    # The scrape being answered has sent request-started, not yet request-finished.
    requests = 2 + SCRAPES
    assert value("sigtrace_signal_sends_total", signal="request-started") == requests
    assert value("sigtrace_signal_sends_total", signal="request-finished") == requests - 1
    timed = {
        dict(labels)["endpoint"]: count
        for (name, labels), count in samples.items()
        if name == "sigtrace_http_request_duration_seconds_count"
    }
    assert timed == {"ping": 1.0}, timed
