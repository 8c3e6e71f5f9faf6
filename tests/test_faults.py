"""Faults inside sigtrace never reach the app, and are logged exactly once.

Each fault (a tracer whose ``start_span`` raises, metric children whose
``inc``/``observe`` raise, naming that fails) is injected into an app that is
then driven through the same script as an identical app without sigtrace: the
responses, send results, exceptions, receiver calls and the current span after
every call must be the same, and the ``sigtrace`` logger must have said exactly
one warning however many calls failed.

The OTLP tests run a small app in a subprocess configured only by ``OTEL_*``
variables, with the endpoint down from the start or going down mid-run: every
request succeeds, none waits on the exporter, and the span queue stays within
``OTEL_BSP_MAX_QUEUE_SIZE``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import typing as t
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from blinker import NamedSignal
from flask import Flask, current_app, jsonify
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import CollectorRegistry

from sigtrace import SigTrace, dispatch, faults, metrics, naming

ROUNDS = 25
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("clean_otel_context")


class InjectedFault(Exception):
    """Raised by the sabotaged parts of sigtrace, never by the app."""


# --------------------------------------------------------------------------
# The app under test: built identically with and without sigtrace


class Cart:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def on_order(self, sender: object, n: str, **kwargs: object) -> str:
        self.calls.append(f"cart {n}")
        return f"cart:{n}"


class Auditor:
    """A callable object receiver."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def __call__(self, sender: object, n: str, **kwargs: object) -> str:
        self.calls.append(f"audit {n}")
        return f"audit:{n}"


class World:
    """An app with signals and receivers of several kinds, each call logged."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.raised: list[BaseException] = []
        self.order_placed = NamedSignal("order-placed")
        self.order_async = NamedSignal("order-async")
        self.cart = Cart(self.calls)
        self.auditor = Auditor(self.calls)
        calls, raised = self.calls, self.raised

        def record(sender: object, n: str, **kwargs: object) -> str:
            calls.append(f"record {n}")
            return f"record:{n}"

        def tag(label: str, sender: object, n: str, **kwargs: object) -> str:
            calls.append(f"tag {label} {n}")
            return f"tag:{label}:{n}"

        def reject(sender: object, n: str, **kwargs: object) -> str:
            calls.append(f"reject {n}")
            if n == "bad":
                error = ValueError(f"order {n} rejected")
                raised.append(error)
                raise error
            return "ok"

        async def confirm(sender: object, n: str, **kwargs: object) -> str:
            await asyncio.sleep(0)
            calls.append(f"confirm {n}")
            return f"confirm:{n}"

        self.order_checked = NamedSignal("order-checked")
        self.tagged = functools.partial(tag, "p")
        self.confirm = confirm
        self.reject = reject
        # blinker keeps receivers in sets: their order differs between two
        # worlds, so only the set of results is compared, and the receiver
        # that raises sits alone on its own signal.
        self.connected = lambda: {record, self.cart.on_order, self.tagged, self.auditor}
        for receiver in self.connected():
            self.order_placed.connect(receiver)
        self.order_checked.connect(reject)
        self.order_async.connect(confirm)
        self.app = self._make_app()

    def _make_app(self) -> Flask:
        app = Flask("faults")
        world = self

        @app.get("/order/<n>")
        def order(n: str) -> t.Any:
            sender = current_app._get_current_object()  # type: ignore[attr-defined]
            results = [result for _, result in world.order_placed.send(sender, n=n)]
            results += [result for _, result in world.order_checked.send(sender, n=n)]
            return jsonify(sorted(results))

        @app.get("/async-order/<n>")
        async def async_order(n: str) -> t.Any:
            sender = current_app._get_current_object()  # type: ignore[attr-defined]
            results = await world.order_async.send_async(sender, n=n)
            return jsonify([result for _, result in results])

        return app


def current_span_name() -> str:
    span = trace.get_current_span()
    return str(getattr(span, "name", "<no span>"))


def outcome(call: Callable[[], t.Any], world: World) -> tuple[t.Any, ...]:
    """What one call returned or raised, as the app would see it."""
    try:
        return ("returned", call())
    except Exception as exc:
        own = bool(world.raised) and exc is world.raised[-1]
        return ("raised", type(exc).__name__, str(exc), "the receiver's own" if own else "other")


def run_script(world: World, parent_tracer: trace.Tracer, rounds: int = ROUNDS) -> list[t.Any]:
    """Drive ``world`` through requests and sends; return everything the app saw."""
    out: list[t.Any] = []
    client = world.app.test_client()

    def get(path: str) -> tuple[int, t.Any]:
        response = client.get(path)
        return response.status_code, response.get_json(silent=True)

    def send(signal: NamedSignal, n: str) -> tuple[list[t.Any], bool]:
        results = signal.send(world, n=n)
        same = {r for r, _ in results} <= world.connected() | {world.reject}
        return sorted((type(r).__name__, v) for r, v in results), same

    def send_async(n: str) -> list[t.Any]:
        results = asyncio.run(world.order_async.send_async(world, n=n))
        return [(r is world.confirm, v) for r, v in results]

    for i in range(rounds):
        for path in (f"/order/{i}", "/order/bad", f"/async-order/{i}"):
            out.append((f"GET {path}", outcome(lambda path=path: get(path), world)))
            out.append(("current span after request", current_span_name()))
        world.app.config["PROPAGATE_EXCEPTIONS"] = True
        out.append(("GET /order/bad propagating", outcome(lambda: get("/order/bad"), world)))
        world.app.config["PROPAGATE_EXCEPTIONS"] = None
        out.append(("current span after request", current_span_name()))
        with parent_tracer.start_as_current_span(f"job {i}"):
            sends = ((world.order_placed, str(i)), (world.order_checked, "bad"))
            for signal, n in sends:
                out.append(
                    (f"send {signal.name}", outcome(lambda s=signal, n=n: send(s, n), world))
                )
                out.append(("current span after send", current_span_name()))
            out.append(("send_async", outcome(lambda i=i: send_async(str(i)), world)))
            out.append(("current span after send_async", current_span_name()))
        out.append(("current span after job", current_span_name()))
        # No recording parent (none at all, then an unsampled one): the lean
        # send path, metrics only.
        unsampled = NonRecordingSpan(SpanContext(7, 9, is_remote=True, trace_flags=TraceFlags(0)))
        for parent in (None, unsampled):
            token = otel_context.attach(trace.set_span_in_context(parent)) if parent else None
            try:
                for signal, n in ((world.order_placed, str(i)), (world.order_checked, "bad")):
                    label = f"send {signal.name} unrecorded"
                    out.append((label, outcome(lambda s=signal, n=n: send(s, n), world)))
            finally:
                if token is not None:
                    otel_context.detach(token)
    out.append(("calls", sorted(world.calls)))
    return out


@pytest.fixture
def parent_tracer() -> trace.Tracer:
    """The app's own tracer (not sigtrace's), for the spans sends run under."""
    return TracerProvider().get_tracer("the-app")


@pytest.fixture
def baseline(registry: CollectorRegistry, parent_tracer: trace.Tracer) -> list[t.Any]:
    """What the script observes without sigtrace."""
    return run_script(World(), parent_tracer)


@pytest.fixture
def fresh_fault_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """sigtrace remembers logged faults process-wide; each test starts clean."""
    monkeypatch.setattr(faults, "_logged", set())


def sigtrace_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "sigtrace" and r.levelno >= logging.WARNING
    ]


def assert_same_behaviour(baseline: list[t.Any], observed: list[t.Any], fault: str) -> None:
    for expected, got in zip(baseline, observed, strict=True):
        assert got == expected, (
            f"with {fault} the app observed {got!r} where without sigtrace it observed "
            f"{expected!r}: a fault inside sigtrace changed the app's behaviour"
        )


def assert_one_warning(caplog: pytest.LogCaptureFixture, fault: str) -> None:
    warnings = sigtrace_warnings(caplog)
    assert len(warnings) == 1, (
        f"with {fault}, {ROUNDS} rounds of requests and sends logged {len(warnings)} "
        f"sigtrace warnings, expected exactly one: {warnings}"
    )


def in_memory_provider() -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    return provider


# --------------------------------------------------------------------------
# Injected faults


class RaisingTracer(trace.Tracer):
    def start_span(self, *args: t.Any, **kwargs: t.Any) -> trace.Span:
        raise InjectedFault("start_span")

    def start_as_current_span(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        raise InjectedFault("start_as_current_span")


class RaisingTracerProvider(trace.TracerProvider):
    def get_tracer(self, *args: t.Any, **kwargs: t.Any) -> trace.Tracer:
        return RaisingTracer()


class RaisingCounter(metrics.CounterChild):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__()

        def inc() -> object:
            raise InjectedFault("inc")

        self.inc = inc


class RaisingHistogram(metrics.HistogramChild):
    __slots__ = ()

    def __init__(self, bounds: tuple[float, ...]) -> None:
        super().__init__(bounds)

        def record(amount: float) -> None:  # what the send calls
            raise InjectedFault("record")

        self.record = record

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        raise InjectedFault("observe")


def sabotage_children(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Make every metric child of ``kind`` the families create raise when used."""
    make_child = metrics.MetricFamily._make_child

    def faulty_child(self: metrics.MetricFamily, values: tuple[str, ...]) -> t.Any:
        if self.kind != kind:
            return make_child(self, values)
        return RaisingCounter() if kind == "counter" else RaisingHistogram(self.bounds)

    monkeypatch.setattr(metrics.MetricFamily, "_make_child", faulty_child)


def instrument_world(
    registry: CollectorRegistry, provider: trace.TracerProvider
) -> tuple[World, SigTrace]:
    world = World()
    return world, SigTrace(world.app, registry=registry, tracer_provider=provider)


def _fail_naming(function: str) -> t.Callable[[pytest.MonkeyPatch], None]:
    def inject(monkeypatch: pytest.MonkeyPatch) -> None:
        def failing(*args: object, **kwargs: object) -> t.NoReturn:
            raise InjectedFault(function)

        monkeypatch.setattr(naming, function, failing)

    return inject


def _no_injection(monkeypatch: pytest.MonkeyPatch) -> None:
    return None


# fault described -> (how to inject it, the tracer provider sigtrace gets)
FAULTS: dict[str, tuple[t.Callable[[pytest.MonkeyPatch], None], t.Callable[[], t.Any]]] = {
    "a tracer whose start_span raises": (_no_injection, lambda: RaisingTracerProvider()),
    "histogram children whose record and observe raise": (
        lambda mp: sabotage_children(mp, "histogram"),
        lambda: in_memory_provider(),
    ),
    # prometheus-client's multiprocess children write to mmap files: inc can fail.
    "counter children whose inc raises": (
        lambda mp: sabotage_children(mp, "counter"),
        lambda: in_memory_provider(),
    ),
    "naming.receiver_info raising": (_fail_naming("receiver_info"), lambda: in_memory_provider()),
    "naming.signal_name raising": (_fail_naming("signal_name"), lambda: in_memory_provider()),
}


@pytest.mark.usefixtures("fresh_fault_log")
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_fault_inside_sigtrace_changes_nothing_and_warns_once(
    fault: str,
    registry: CollectorRegistry,
    parent_tracer: trace.Tracer,
    baseline: list[t.Any],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inject, provider = FAULTS[fault]
    inject(monkeypatch)
    world, ext = instrument_world(registry, provider())
    try:
        with caplog.at_level(logging.DEBUG, logger="sigtrace"):
            observed = run_script(world, parent_tracer)
    finally:
        ext.close()
    assert_same_behaviour(baseline, observed, fault)
    assert_one_warning(caplog, fault)


# --------------------------------------------------------------------------
# Odd callables: naming must cope without any injected fault


class HostileMeta(type):
    """Every attribute lookup on the class raises (a broken proxy class)."""

    def __getattribute__(cls, name: str) -> t.Any:
        if name.startswith("__") and name not in ("__call__", "__mro__", "__dict__"):
            raise InjectedFault(f"class attribute {name}")
        return super().__getattribute__(name)


class HostileReceiver(metaclass=HostileMeta):
    def __call__(self, sender: object, **kwargs: object) -> str:
        return "hostile"


class LyingReceiver:
    """A class whose ``__module__`` is not a string."""

    __module__ = 42  # type: ignore[assignment]

    def __call__(self, sender: object, **kwargs: object) -> str:
        return "lying"


def test_odd_callables_are_named_without_errors_or_warnings(
    instrumented: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    sig = NamedSignal("odd-callables")
    hostile, lying = HostileReceiver(), LyingReceiver()
    sig.connect(hostile)
    sig.connect(lying)
    with caplog.at_level(logging.DEBUG, logger="sigtrace"):
        for _ in range(ROUNDS):
            # blinker calls receivers in set order, not connection order
            results = sig.send("s")
            assert sorted(v for _, v in results) == ["hostile", "lying"]
            assert {id(r) for r, _ in results} == {id(hostile), id(lying)}
    receivers = {
        s.labels["receiver"]
        for family in instrumented.collect()
        for s in family.samples
        if s.name == "sigtrace_receiver_duration_seconds_count"
        and s.labels["signal"] == "odd-callables"
    }
    assert receivers and all("0x" not in name for name in receivers), receivers
    assert len(sigtrace_warnings(caplog)) <= 1, sigtrace_warnings(caplog)


class ExplodingAttributes:
    """A callable whose instance attribute lookups raise (a broken proxy)."""

    def __getattr__(self, name: str) -> t.NoReturn:
        raise InjectedFault(f"instance attribute {name}")

    def __call__(self, sender: object, **kwargs: object) -> str:
        return "called"


def outcome_of_send(sig: NamedSignal) -> tuple[str, str]:
    try:
        return "returned", repr([v for _, v in sig.send("s")])
    except Exception as exc:
        return "raised", f"{type(exc).__name__}: {exc}"


def test_receiver_whose_attribute_lookups_raise_behaves_as_in_blinker(
    registry: CollectorRegistry,
) -> None:
    # blinker's send asks inspect.iscoroutinefunction(receiver) on every send,
    # which reads the receiver's attributes; sigtrace caches that answer and
    # must not turn blinker's exception into a call of the receiver.
    sig = NamedSignal("exploding-attributes")
    receiver = ExplodingAttributes()
    sig.connect(receiver)
    expected = outcome_of_send(sig)
    dispatch.instrument(registry=registry)
    got = outcome_of_send(sig)
    assert got == expected, (
        f"without sigtrace a send {expected[0]} {expected[1]!r}, with it the send "
        f"{got[0]} {got[1]!r}: sigtrace swallowed blinker's iscoroutinefunction error"
    )


# --------------------------------------------------------------------------
# The OTLP endpoint down: requests never wait on the exporter

APP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading, time, tracemalloc

    from blinker import NamedSignal
    from flask import Flask, current_app
    from opentelemetry import trace

    from sigtrace import SigTrace

    placed = NamedSignal("order-placed")
    for index in range(3):
        def receiver(sender, n, index=index):
            return index
        receiver.__qualname__ = f"receiver_{index}"
        placed.connect(receiver, weak=False)

    app = Flask("otlp-down")

    @app.get("/order/<n>")
    def order(n):
        placed.send(current_app._get_current_object(), n=n)
        return "ok"

    SigTrace(app)

    processor = trace.get_tracer_provider()._active_span_processor._span_processors[0]
    exports_on_request_thread = []
    # The SDK's batch processor: its worker moved into _batch_processor in 1.28.
    batch = getattr(processor, "_batch_processor", processor)
    exporter = getattr(batch, "_exporter", None) or batch.span_exporter
    export = exporter.export

    def watched_export(spans):
        if threading.current_thread() is threading.main_thread():
            exports_on_request_thread.append(len(spans))
        return export(spans)

    exporter.export = watched_export

    def queue_length():
        return len(getattr(batch, "_queue", None) or getattr(batch, "queue", ()))

    def phase(name, requests):
        client = app.test_client()
        statuses, slowest, queue_max, memory = set(), 0.0, 0, []
        del exports_on_request_thread[:]
        for i in range(requests):
            started = time.perf_counter()
            statuses.add(client.get(f"/order/{i}").status_code)
            slowest = max(slowest, time.perf_counter() - started)
            queue_max = max(queue_max, queue_length())
            if i % (requests // 10) == 0:
                memory.append(tracemalloc.get_traced_memory()[0])
        memory.append(tracemalloc.get_traced_memory()[0])
        print(json.dumps({"phase": name, "statuses": sorted(statuses), "slowest": slowest,
                          "queue_max": queue_max, "memory": memory,
                          "exports_on_request_thread": len(exports_on_request_thread)}),
              flush=True)

    tracemalloc.start()
    requests = int(sys.argv[1])
    if len(sys.argv) > 2:  # two phases: the endpoint goes down in between
        phase("up", requests)
        print("waiting", flush=True)
        sys.stdin.readline()
    phase("down", requests)
    """
)

QUEUE_SIZE = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def otlp_env(endpoint: str, protocol: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SIGTRACE_"))}
    env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_EXPORTER_OTLP_TIMEOUT="1",
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_BSP_MAX_QUEUE_SIZE=str(QUEUE_SIZE),
        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="16",
        OTEL_BSP_EXPORT_TIMEOUT="1000",
        OTEL_SERVICE_NAME="otlp-down",
        PYTHONPATH=str(REPO),
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


@pytest.fixture
def app_script(tmp_path: Path) -> Path:
    path = tmp_path / "otlp_down_app.py"
    path.write_text(APP_SCRIPT)
    return path


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, *args],
            env=env,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def assert_phase_healthy(report: dict[str, t.Any], requests: int) -> None:
    name = report["phase"]
    assert report["statuses"] == [200], f"{name}: requests failed: {report}"
    # Exports run on the batch processor's thread, never on the request's (the
    # requests run on the main thread): a request never waits on the exporter.
    assert report["exports_on_request_thread"] == 0, f"{name}: a request exported: {report}"
    assert report["queue_max"] <= QUEUE_SIZE, f"{name}: span queue past its limit: {report}"
    memory = report["memory"]
    growth = memory[-1] - memory[len(memory) // 2]
    # Keeping every span (five a request) costs about 14 kB a request here, 7 MB
    # over this half; the full queue of 64 spans is about 200 kB.
    assert growth < 2_000_000, (
        f"{name}: traced memory grew by {growth} bytes over the second half of "
        f"{requests} requests while the exporter could not connect: {memory}"
    )


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_endpoint_down_from_start_never_delays_requests(
    protocol: str, app_script: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    requests = 1000
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    process = spawn([str(app_script), str(requests)], otlp_env(endpoint, protocol))
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate(timeout=10)
        pytest.fail(f"the app did not finish:\n{stdout}\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert_phase_healthy(report, requests)


class _AcceptingHandler(BaseHTTPRequestHandler):
    """Accepts every OTLP/HTTP export (the body is not decoded here)."""

    posts = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).posts += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: t.Any) -> None:
        return None


def test_otlp_endpoint_going_down_mid_run_never_delays_requests(
    app_script: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    requests = 800
    handler = type("Handler", (_AcceptingHandler,), {"posts": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    process = spawn(
        [str(app_script), str(requests), "two-phases"], otlp_env(endpoint, "http/protobuf")
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        up = json.loads(_read_line(process, timeout=60))
        assert _read_line(process, timeout=10) == "waiting"
        assert handler.posts > 0, "the exporter never reached the endpoint while it was up"
        assert_phase_healthy(up, requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    process.stdin.write("go\n")
    process.stdin.flush()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    down = json.loads(stdout.strip().splitlines()[-1])
    assert_phase_healthy(down, requests)


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    """One stdout line of ``process``, failing after ``timeout`` seconds."""
    assert process.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not lines:
        process.kill()
        reader.join(10)
        pytest.fail(f"no output from the app within {timeout} s: {process.stderr.read()[-3000:]}")  # type: ignore[union-attr]
    return lines[0].strip()
