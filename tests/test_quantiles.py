"""Quantiles shown by the CLI and the demo are estimates from the buckets, and say so;
the default buckets resolve a receiver taking a steady 20 ms within 10 %.

The durations are fed to the receiver's histogram directly (known values, no
sleeping): what is tested is the estimate from the buckets, not the clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
from blinker import Namespace
from flask import Flask
from prometheus_client import CollectorRegistry

from examples.span_tree import render_receivers, slowest_receivers
from sigtrace import SigTrace
from sigtrace.metrics import DEFAULT_BUCKETS, metric_set

NS = Namespace()
order_shipped = NS.signal("quantiles-order-shipped")
RECEIVER = f"{__name__}.call_carrier"


def call_carrier(sender: object, **kwargs: object) -> None:
    """The receiver whose durations are fed in (it is never sent to here)."""


# A receiver that sleeps 20 ms takes a little more: 20.0 to 21.5 ms.
STEADY_20_MS = [0.0200 + 0.0015 * i / 99 for i in range(100)]


@pytest.fixture
def app(registry: CollectorRegistry) -> Iterator[Flask]:
    app = Flask("quantiles")
    ext = SigTrace(app, registry=registry)
    order_shipped.connect(call_carrier)
    metrics = app.extensions["sigtrace"].metrics
    child = metrics.receiver_duration.child("quantiles-order-shipped", RECEIVER)
    for seconds in STEADY_20_MS:
        child.observe(seconds)
    yield app
    order_shipped.disconnect(call_carrier)
    ext.close()


def cli_receiver(app: Flask) -> dict[str, object]:
    result = app.test_cli_runner().invoke(args=["sigtrace", "signals", "--json"])
    assert result.exit_code == 0, result.output
    (signal,) = [s for s in json.loads(result.output)["signals"] if s["name"] == order_shipped.name]
    (receiver,) = signal["receivers"]
    return dict(receiver)


def test_the_cli_resolves_a_steady_20_ms_receiver_within_10_percent(app: Flask) -> None:
    receiver = cli_receiver(app)
    assert receiver["calls"] == len(STEADY_20_MS)
    for key in ("p50_seconds", "p99_seconds"):
        estimate = t_float(receiver[key])
        assert math.isclose(estimate, 0.0207, rel_tol=0.10), (key, estimate)


def t_float(value: object) -> float:
    assert isinstance(value, float), value
    return value


def test_the_cli_table_says_its_quantiles_are_estimates(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["sigtrace", "signals"])
    lines = result.output.splitlines()
    assert "P50*" in lines[0].split() and "P99*" in lines[0].split()
    assert lines[-1].startswith("* estimated from the histogram buckets")
    (row,) = [line for line in lines if RECEIVER in line]
    assert "21.0ms" in row.split(), row  # p50: the middle of the 20-22 ms bucket


def test_the_demo_table_says_its_quantiles_are_estimates(
    app: Flask, registry: CollectorRegistry
) -> None:
    rows = [row for row in slowest_receivers(registry) if row.receiver == RECEIVER]
    table = render_receivers(rows)
    assert "p50/p99 estimated from histogram buckets" in table.splitlines()[0]
    (row,) = rows
    assert row.p50 is not None and math.isclose(row.p50, 0.0207, rel_tol=0.10)
    assert row.p99 is not None and math.isclose(row.p99, 0.0207, rel_tol=0.10)


def test_without_the_20_and_22_ms_bounds_the_estimate_is_off_by_more() -> None:
    """Why those bounds are there: the 10-25 ms bucket alone says 17.5 ms."""
    coarse = tuple(b for b in DEFAULT_BUCKETS if b not in (0.02, 0.022))
    for bounds, close in ((DEFAULT_BUCKETS, True), (coarse, False)):
        registry = CollectorRegistry()
        child = metric_set(registry, bounds).receiver_duration.child("s", RECEIVER)
        for seconds in STEADY_20_MS:
            child.observe(seconds)
        (row,) = slowest_receivers(registry)
        assert row.p50 is not None
        assert math.isclose(row.p50, 0.0207, rel_tol=0.10) is close, (bounds, row.p50)
