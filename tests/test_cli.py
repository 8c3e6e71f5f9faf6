"""``flask sigtrace signals`` lists signals, receivers and their statistics."""

from __future__ import annotations

import json
import math
import re
import typing as t
from collections.abc import Iterator

import blinker
import flask
import pytest
from flask import Flask
from prometheus_client import CollectorRegistry

from sigtrace import SigTrace
from sigtrace.cli import describe_sender, histogram_quantile
from tests.conftest import sample

FLASK_SIGNALS = [
    "appcontext-popped",
    "appcontext-pushed",
    "appcontext-tearing-down",
    "before-render-template",
    "got-request-exception",
    "message-flashed",
    "request-finished",
    "request-started",
    "request-tearing-down",
    "template-rendered",
]

# Every call lands in the first bucket, (0, 5 s]: Prometheus' interpolation then
# gives p50 = 2.5 s and p99 = 4.95 s whatever the real durations were.
BUCKETS = [5.0, 10.0]

order_placed = blinker.Namespace().signal("cli-test-order-placed")


ORDER_CALLS: list[object] = []


def on_order_placed(sender: object, **kwargs: object) -> None:
    # blinker's receiver order is undefined: on a send where the ledger raises,
    # this one may or may not have run first. The tests count its real calls.
    ORDER_CALLS.append(sender)


class Ledger:
    def record(self, sender: object, **kwargs: t.Any) -> None:
        if kwargs["amount"] < 0:
            raise ValueError("negative amount")


@pytest.fixture
def app(registry: CollectorRegistry) -> Iterator[Flask]:
    app = Flask(__name__)
    app.config["SIGTRACE_TRACING"] = False
    app.config["SIGTRACE_BUCKETS"] = BUCKETS

    @app.route("/ping")
    def ping() -> str:
        return "pong"

    ext = SigTrace(app, registry=registry)
    try:
        yield app
    finally:
        ext.close()


@pytest.fixture
def connected() -> Iterator[Ledger]:
    """Three receivers on ``order_placed``: a function, a bound method (both weak)
    and a strong lambda for sender "shop" only."""
    ledger = Ledger()
    ORDER_CALLS.clear()
    order_placed.connect(on_order_placed)
    order_placed.connect(ledger.record)
    only_shop = order_placed.connect(lambda sender, **kw: None, sender="shop", weak=False)
    try:
        yield ledger
    finally:
        order_placed.disconnect(on_order_placed)
        order_placed.disconnect(ledger.record)
        order_placed.disconnect(only_shop)  # ANY: disconnected from every sender


def send_orders(shop: int, other: int, negative: int) -> None:
    """``shop`` sends from "shop", ``other`` from "other", then ``negative``
    failing sends from "other" (the ledger raises)."""
    for _ in range(shop):
        order_placed.send("shop", amount=1)
    for _ in range(other):
        order_placed.send("other", amount=1)
    for _ in range(negative):
        with pytest.raises(ValueError):
            order_placed.send("other", amount=-1)


def run_cli(app: Flask, *args: str) -> str:
    result = app.test_cli_runner().invoke(args=["sigtrace", "signals", *args])
    assert result.exit_code == 0, (result.output, repr(result.exception))
    return result.output


def signals_json(app: Flask) -> dict[str, t.Any]:
    document: dict[str, t.Any] = json.loads(run_cli(app, "--json"))
    return document


def by_name(document: dict[str, t.Any]) -> dict[str, dict[str, t.Any]]:
    return {signal["name"]: signal for signal in document["signals"]}


LAMBDA = "tests.test_cli.connected.<locals>.<lambda>"


def test_json_lists_receivers_with_calls_errors_and_quantiles(
    app: Flask, connected: Ledger, registry: CollectorRegistry
) -> None:
    send_orders(shop=7, other=3, negative=2)
    signal = by_name(signals_json(app))["cli-test-order-placed"]
    assert signal["sends"] == 12
    assert signal["receivers"] == [
        {
            "name": "tests.test_cli.on_order_placed",
            "ref": "weak",
            "senders": ["ANY"],
            "calls": len(ORDER_CALLS),
            "p50_seconds": 2.5,
            "p99_seconds": pytest.approx(4.95),
            "errors": 0,
        },
        {
            "name": "tests.test_cli.Ledger.record",
            "ref": "weak",
            "senders": ["ANY"],
            "calls": 12,
            "p50_seconds": 2.5,
            "p99_seconds": pytest.approx(4.95),
            "errors": 2,
        },
        {
            "name": LAMBDA,
            "ref": "strong",
            "senders": ['"shop"'],
            "calls": 7,
            "p50_seconds": 2.5,
            "p99_seconds": pytest.approx(4.95),
            "errors": 0,
        },
    ]
    # The CLI reads the registry: the same numbers are in the exposition.
    labels = {"signal": "cli-test-order-placed", "receiver": "tests.test_cli.Ledger.record"}
    assert sample(registry, "sigtrace_receiver_duration_seconds_count", **labels) == 12
    assert sample(registry, "sigtrace_receiver_errors_total", **labels, exception="ValueError") == 2


def test_receivers_not_yet_called_have_zero_calls_and_no_quantiles(
    app: Flask, connected: Ledger
) -> None:
    send_orders(shop=0, other=4, negative=0)
    receivers = by_name(signals_json(app))["cli-test-order-placed"]["receivers"]
    only_shop = next(r for r in receivers if r["name"] == LAMBDA)
    assert (only_shop["calls"], only_shop["p50_seconds"], only_shop["errors"]) == (0, None, 0)
    assert [r["calls"] for r in receivers] == [4, 4, 0]


def test_table_has_one_aligned_row_per_receiver(app: Flask, connected: Ledger) -> None:
    send_orders(shop=4, other=0, negative=1)
    lines = run_cli(app).splitlines()
    header = lines[0]
    assert header.split() == [
        "SIGNAL", "SENDS", "RECEIVER", "REF", "SENDERS", "CALLS", "P50*", "P99*", "ERRORS",
    ]  # fmt: skip
    # The quantiles say they are estimates, in a footnote under the table.
    assert lines[-1].startswith("* estimated from the histogram buckets")
    lines = lines[:-1]
    rows = [line for line in lines if line.startswith("cli-test-order-placed ")]
    assert [re.split(r"\s{2,}", row) for row in rows] == [
        ["cli-test-order-placed", "5", "tests.test_cli.on_order_placed", "weak", "ANY",
         str(len(ORDER_CALLS)), "2.50s", "4.95s", "0"],
        ["cli-test-order-placed", "5", "tests.test_cli.Ledger.record", "weak", "ANY",
         "5", "2.50s", "4.95s", "1"],
        ["cli-test-order-placed", "5", LAMBDA, "strong", '"shop"', "4", "2.50s", "4.95s", "0"],
    ]  # fmt: skip
    # Text columns start where their header starts, on every line.
    for column in ("RECEIVER", "REF", "SENDERS"):
        start = header.index(column)
        assert all(line[start - 2 : start] == "  " and line[start] != " " for line in lines[1:])


def test_flask_signals_are_listed_without_sigtrace_hooks(app: Flask) -> None:
    assert app.test_client().get("/ping").status_code == 200
    signals = by_name(signals_json(app))
    assert set(FLASK_SIGNALS) <= set(signals)
    # sigtrace times requests with hooks, not receivers: none may show up.
    names = [r["name"] for s in signals.values() for r in s["receivers"]]
    assert not [name for name in names if name.startswith("sigtrace.")]
    assert signals["request-started"]["sends"] == 1
    assert signals["request-finished"]["sends"] == 1


def test_flask_signal_receivers_are_listed(app: Flask) -> None:
    def on_request(sender: Flask, **kwargs: object) -> None:
        return None

    flask.request_started.connect(on_request, app)
    try:
        app.test_client().get("/ping")
        app.test_client().get("/ping")
        started = by_name(signals_json(app))["request-started"]
    finally:
        flask.request_started.disconnect(on_request, app)
    mine = [r for r in started["receivers"] if r["name"].startswith("tests.")]
    assert mine == [
        {
            "name": "tests.test_cli.test_flask_signal_receivers_are_listed.<locals>.on_request",
            "ref": "weak",
            "senders": ["flask.app.Flask instance"],
            "calls": 2,
            "p50_seconds": 2.5,
            "p99_seconds": pytest.approx(4.95),
            "errors": 0,
        }
    ]


def test_default_namespace_signals_are_listed_before_any_send(app: Flask) -> None:
    blinker.signal("cli-test-declared-only")
    signal = by_name(signals_json(app))["cli-test-declared-only"]
    assert signal == {"name": "cli-test-declared-only", "sends": 0, "receivers": []}


def test_without_metrics_no_stats_are_shown(registry: CollectorRegistry, connected: Ledger) -> None:
    app = Flask(__name__)
    app.config.update(SIGTRACE_METRICS=False, SIGTRACE_TRACING=False)
    ext = SigTrace(app, registry=registry)
    try:
        send_orders(shop=1, other=0, negative=0)
        document = signals_json(app)
        table = run_cli(app)
    finally:
        ext.close()
    assert document["metrics"] is False
    signal = by_name(document)["cli-test-order-placed"]
    assert signal["sends"] is None
    assert signal["receivers"][0] == {
        "name": "tests.test_cli.on_order_placed",
        "ref": "weak",
        "senders": ["ANY"],
        "calls": None,
        "p50_seconds": None,
        "p99_seconds": None,
        "errors": None,
    }
    assert table.splitlines()[0].split() == ["SIGNAL", "RECEIVER", "REF", "SENDERS"]


class Sender:
    def __repr__(self) -> str:
        raise AssertionError("the CLI must never call a sender's repr")


def named_sender() -> None:
    return None


def test_senders_are_described_without_their_repr(app: Flask) -> None:
    signal = blinker.signal("cli-test-senders")
    sender = Sender()

    def receiver(sender: object) -> None:
        return None

    for each in (sender, Sender, 42, "name", named_sender):
        signal.connect(receiver, sender=each)
    try:
        receivers = by_name(signals_json(app))["cli-test-senders"]["receivers"]
    finally:
        signal.receivers.clear()  # a test-local signal: drop every connection
    assert len(receivers) == 1
    assert sorted(receivers[0]["senders"]) == sorted(
        [
            "tests.test_cli.Sender instance",
            "class tests.test_cli.Sender",
            "42",
            '"name"',
            "function tests.test_cli.named_sender",
        ]
    )


def test_describe_sender_bounds_long_strings() -> None:
    assert len(describe_sender("x" * 1000)) <= 200
    assert describe_sender(True) == "True"
    assert describe_sender(blinker.ANY) == "ANY"


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        # rank 15 lies in (0.1, 0.2] holding 20 of 30: 0.1 + 0.1 * 5/20
        (0.5, [(0.1, 10.0), (0.2, 30.0), (math.inf, 30.0)], 0.125),
        # rank 5 in the first bucket interpolates from 0
        (0.5, [(0.1, 10.0), (0.2, 10.0), (math.inf, 10.0)], 0.05),
        # rank in +Inf: the highest finite bound
        (0.99, [(0.1, 1.0), (0.2, 2.0), (math.inf, 100.0)], 0.2),
        # empty buckets before the rank are skipped
        (0.5, [(0.1, 0.0), (0.2, 0.0), (0.4, 4.0), (math.inf, 4.0)], 0.3),
        # no observations: no estimate
        (0.5, [(0.1, 0.0), (math.inf, 0.0)], None),
    ],
)
def test_histogram_quantile_matches_prometheus(
    q: float, buckets: list[tuple[float, float]], expected: float | None
) -> None:
    assert histogram_quantile(q, buckets) == (None if expected is None else pytest.approx(expected))


def test_command_fails_cleanly_once_sigtrace_is_closed(registry: CollectorRegistry) -> None:
    app = Flask(__name__)
    app.config["SIGTRACE_TRACING"] = False
    SigTrace(app, registry=registry).close()
    result = app.test_cli_runner().invoke(args=["sigtrace", "signals"])
    assert result.exit_code == 1
    assert "SigTrace is not initialised on this app" in result.output


private_signals = blinker.Namespace()
never_sent = private_signals.signal("cli-test-never-sent")


class Worker:
    on_ready = blinker.Signal()


def on_never_sent(sender: object, **kwargs: object) -> None:
    return None


def test_unsent_signals_with_receivers_are_listed_by_their_label(app: Flask) -> None:
    never_sent.connect(on_never_sent)
    Worker.on_ready.connect(on_never_sent)
    try:
        signals = by_name(signals_json(app))
    finally:
        never_sent.disconnect(on_never_sent)
        Worker.on_ready.disconnect(on_never_sent)
    assert signals["cli-test-never-sent"]["sends"] == 0
    receiver = f"{__name__}.on_never_sent"
    assert [r["name"] for r in signals["cli-test-never-sent"]["receivers"]] == [receiver]
    anonymous = signals[f"{__name__}.Worker.on_ready"]
    assert [r["name"] for r in anonymous["receivers"]] == [receiver]


class _Hostile(type):
    def __getattribute__(cls, name: str) -> t.Any:
        if name == "__class__":
            raise RuntimeError("no class for you")
        return super().__getattribute__(name)


class _HostileObject(metaclass=_Hostile):
    pass


def test_the_heap_scan_survives_hostile_objects_and_signal_mocks(app: Flask) -> None:
    from unittest import mock

    hostile = _HostileObject()
    fake = mock.Mock(spec=blinker.Signal)  # isinstance(fake, Signal) is True
    never_sent.connect(on_never_sent)
    try:
        signals = by_name(signals_json(app))
    finally:
        never_sent.disconnect(on_never_sent)
    assert "cli-test-never-sent" in signals
    assert hostile is not None and fake is not None


def test_under_multiproc_dir_it_shows_all_workers_and_writes_nothing(
    tmp_path: t.Any,
) -> None:
    """A real 2-worker gunicorn serves requests; the CLI, run as its own process
    on the same app and directory, shows the workers' totals, says so, and
    leaves every file in the directory as it was."""
    import subprocess
    import sys

    from tests.servers import REPO, TOTALS, clean_env, start_gunicorn

    gunicorn = start_gunicorn(tmp_path)
    try:
        n = len(gunicorn.load_every_worker(40))  # both workers publish their boot send
        gunicorn.wait_for_totals(n)
        directory = gunicorn.prometheus_dir
        before = {p.name: p.read_bytes() for p in directory.iterdir()}

        def cli(*args: str) -> str:
            done = subprocess.run(
                [
                    *(sys.executable, "-m", "flask", "--app", "tests.apps.gunicorn_app:app"),
                    *("sigtrace", "signals", *args),
                ],
                cwd=REPO,
                env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(directory)),
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            return done.stdout

        document = json.loads(cli("--json"))  # while the workers run
        table = cli()
        # No new file (the workers may have rewritten their own meanwhile).
        assert {p.name for p in directory.iterdir()} == set(before)
    finally:
        gunicorn.stop()
    # Quiescent now: a CLI run changes no byte and adds no file.
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert gunicorn.directory_totals() == [n] * len(TOTALS)
    quiet = json.loads(cli("--json"))
    assert by_name(quiet)["gunicorn-signup"]["sends"] == n
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert json.loads(cli("--json")) == quiet  # its own sends were never added
    assert gunicorn.directory_totals() == [n] * len(TOTALS)

    assert document["scope"] == "all-processes"
    signals = by_name(document)
    assert signals["gunicorn-signup"]["sends"] == n
    assert [r["calls"] for r in signals["gunicorn-signup"]["receivers"]] == [n, n]
    # Each worker imported the app once; the CLI's own import is not counted.
    assert signals["gunicorn-boot"]["sends"] == 2
    assert table.splitlines()[0] == (
        f"Totals over all processes publishing to PROMETHEUS_MULTIPROC_DIR={directory}"
    )
    assert re.search(rf"^gunicorn-signup\s+{n}\s", table, re.MULTILINE), table
