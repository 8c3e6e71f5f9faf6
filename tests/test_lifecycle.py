"""The process's life: threads, forks and exits, each checked in a process of its own.

Every check runs a short script in a new interpreter (it forks, exits, or lists
the process's threads, none of which a pytest process shared with other tests
can do cleanly). A script that forks waits for its child with a deadline and
reports a child that did not answer in time as hung, so a deadlock fails the
test instead of holding it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import typing as t
from pathlib import Path

import pytest

from tests.otlp_receiver import ReceivedPoint, running_receiver
from tests.servers import BOOT_SIGNAL, SIGNAL, Server, start_uwsgi

SCRIPT_TIMEOUT = 120.0  # seconds for a whole script; a hung child is reported sooner

# ``in_child(work)`` forks; the child runs ``work()`` and sends back its JSON
# report; the parent waits for it with a deadline, or calls the child hung.
IN_CHILD = """
import json, os, select, sys, time

def in_child(work, graceful=False, deadline=20.0):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, json.dumps(work()).encode())
        os.close(write)
        if graceful:
            sys.exit(0)  # exit hooks run
        os._exit(0)
    os.close(write)
    chunks = []
    end = time.monotonic() + deadline
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0 or not select.select([read], [], [], remaining)[0]:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return {"hung": True}
        chunk = os.read(read, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))
"""

SIGTRACE_THREADS = """
import threading

def sigtrace_threads():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("sigtrace"))
"""


def run_script(*parts: str, **env: str) -> dict[str, t.Any]:
    """Run the script made of ``parts`` in a new interpreter, without the OTEL and
    multiprocess settings of this process, plus ``env``; return the JSON object
    of its last output line."""
    code = "\n".join(textwrap.dedent(part) for part in parts)
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "SIGTRACE_")) and key != "PROMETHEUS_MULTIPROC_DIR"
    }
    environ.update(env)
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=environ,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines, f"the script printed nothing; stderr: {result.stderr}"
    report: dict[str, t.Any] = json.loads(lines[-1])
    return report


def test_a_child_forked_while_a_thread_holds_every_metrics_lock_scrapes_and_folds() -> None:
    """Outside multiprocess mode too: the child takes new locks, and counts only its sends."""
    report = run_script(
        """
        import json, os, threading, time
        from blinker import NamedSignal
        from prometheus_client import CollectorRegistry, generate_latest
        import sigtrace
        from sigtrace import dispatch, faults, lifecycle, metrics
        """,
        IN_CHILD,
        """
        registry = CollectorRegistry()
        sigtrace.instrument(registry=registry)
        work = NamedSignal("forked-work")
        work.connect(lambda sender: None, weak=False)
        for _ in range(3):
            work.send()
        metric_set = dispatch.active_metrics()
        metric_set.tally()
        # every lock a scrape, a fold, a first send or a new label value takes
        locks = [lifecycle._state.lock, dispatch._lock, faults._lock, metrics._sets_lock]
        for family in metric_set.families:
            locks.append(family._lock)
            for _, child in family.children():
                if isinstance(child, metrics.HistogramChild):
                    locks.append(child._lock)
        held, release = threading.Event(), threading.Event()

        def hold():
            for lock in locks:
                lock.acquire()
            held.set()
            release.wait()
            for lock in locks:
                lock.release()

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait()
        def child():
            work.send()
            work.send()
            NamedSignal("new-in-child").send()  # a new label value: the family's lock
            metric_set.tally()
            scrape = generate_latest(registry).decode()
            report = {"scrape": scrape, "running": lifecycle.running()}
            report["threads"] = sorted(t.name for t in threading.enumerate())
            return report

        report = in_child(child)
        release.set()
        holder.join()
        report["parent_scrape"] = generate_latest(registry).decode()
        sigtrace.uninstrument()
        print(json.dumps(report))
        """,
    )
    assert not report.get("hung"), "the forked child hung on a lock its parent's thread held"
    assert 'sigtrace_signal_sends_total{signal="forked-work"} 2.0' in report["scrape"]
    assert 'sigtrace_signal_sends_total{signal="new-in-child"} 1.0' in report["scrape"]
    assert "sigtrace-tally" in report["threads"]  # the child tallies on its own thread
    assert report["running"] == ["sigtrace-tally"]
    assert 'sigtrace_signal_sends_total{signal="forked-work"} 3.0' in report["parent_scrape"]


def _sends_by_instance(points: list[ReceivedPoint], signal: str) -> dict[str, float]:
    """The last ``sigtrace.signal.sends`` value of ``signal`` per service instance."""
    out: dict[str, float] = {}
    for point in points:
        if point.name == "sigtrace.signal.sends" and point.attributes.get("signal") == signal:
            out[str(point.resource["service.instance.id"])] = point.value
    return out


@pytest.mark.parametrize("multiprocess", [False, True], ids=["one-process", "multiproc-dir"])
def test_a_forked_child_pushes_only_its_own_sends_over_otlp(
    multiprocess: bool, tmp_path: Path
) -> None:
    """Parent: 3 sends, fork, 1 more; child: 2. Each pushes its own total at exit.

    With PROMETHEUS_MULTIPROC_DIR set too: the instrumentor has no publisher,
    so the child's copied values are zeroed all the same."""
    env = {}
    if multiprocess:
        directory = tmp_path / "multiproc"
        directory.mkdir(mode=0o700)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    with running_receiver("http/protobuf") as receiver:
        report = run_script(
            """
            import json, os, sys
            from blinker import NamedSignal
            from sigtrace.instrumentor import BlinkerInstrumentor
            """,
            IN_CHILD,
            """
            BlinkerInstrumentor().instrument()
            work = NamedSignal("pushed-work")
            work.connect(lambda sender: None, weak=False)
            for _ in range(3):
                work.send()
            def child():
                work.send()
                work.send()
                return {}

            report = in_child(child, graceful=True)  # a graceful exit: the last push
            work.send()
            print(json.dumps(report))
            """,
            OTEL_METRICS_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_METRIC_EXPORT_INTERVAL="600000",  # only the exit pushes
            **env,
        )
        assert not report.get("hung")
        pushed = _sends_by_instance(receiver.points, "pushed-work")
    assert sorted(pushed.values()) == [2.0, 4.0], pushed


def test_uwsgi_workers_forked_from_c_push_only_their_own_sends_over_otlp(
    tmp_path: Path, servers: list[Server]
) -> None:
    """uWSGI imports the app (one boot send) in its master and forks workers
    from C, where Python's fork hooks do not run: the workers still start from
    zero. Without PROMETHEUS_MULTIPROC_DIR, each process pushes its own series."""
    with running_receiver("http/protobuf") as receiver:
        uwsgi = start_uwsgi(
            tmp_path,
            *("--processes", "2", "--enable-threads"),
            multiprocess=False,
            OTEL_METRICS_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_METRIC_EXPORT_INTERVAL="200",
        )
        servers.append(uwsgi)
        assert len(set(uwsgi.load(40, threads=4))) == 2

        def pushed_every_signup(points: list[ReceivedPoint]) -> dict[str, float]:
            signups = _sends_by_instance(points, SIGNAL)
            return signups if sum(signups.values()) == 40 else {}

        signups = receiver.wait_for_points(pushed_every_signup, 30.0, "every signup pushed")
        boot = _sends_by_instance(receiver.points, BOOT_SIGNAL)
    assert len([n for n in signups.values() if n]) == 2  # both workers pushed their own
    # the master's one boot send, pushed by the master at most: no worker pushes it again
    assert sum(boot[instance] for instance in signups if instance in boot) == 0, boot
    assert sum(boot.values()) <= 1, boot


def test_close_stops_every_thread_and_hook_init_app_started() -> None:
    """Two apps share the threads; after the last close none runs, after a fork
    none starts, at exit nothing more is pushed, and blinker's send is back."""
    with running_receiver("http/protobuf") as receiver:
        report = run_script(
            """
            import blinker
            from flask import Flask
            from prometheus_client import CollectorRegistry
            import sigtrace
            from sigtrace import SigTrace
            """,
            IN_CHILD,
            SIGTRACE_THREADS,
            """
            blinker_send = blinker.Signal.send
            first, second = Flask("first"), Flask("second")
            for app in (first, second):
                app.route("/")(lambda: "ok")
                app.config["SIGTRACE_METRICS_PORT"] = 0
            first_ext, second_ext = SigTrace(first), SigTrace(second)
            assert first.test_client().get("/").status_code == 200
            report = {"running": sigtrace_threads()}
            first_ext.close()
            report["after_first_close"] = sigtrace_threads()
            second_ext.close()
            report["after_close"] = sigtrace_threads()
            report["blinker_send"] = blinker.Signal.send is blinker_send
            # the request hooks no longer act, even under a new instrumentation
            registry = CollectorRegistry()
            sigtrace.instrument(registry=registry)
            assert first.test_client().get("/").status_code == 200
            report["requests_recorded"] = [
                sample.labels
                for family in registry.collect()
                for sample in family.samples
                if sample.name.startswith("sigtrace_http_request")
            ]
            sigtrace.uninstrument()
            report["in_forked_child"] = in_child(sigtrace_threads)
            report["after_uninstrument"] = sigtrace_threads()
            print(json.dumps(report))
            """,
            OTEL_METRICS_EXPORTER="otlp",
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_METRIC_EXPORT_INTERVAL="600000",  # only close (and, wrongly, exit) push
        )
        exports = len(receiver.metric_headers)
        spans = receiver.spans
    assert set(report["running"]) == {
        "sigtrace-tally",
        "sigtrace-otlp-metrics",
        "sigtrace-metrics",  # one server per app on port 0
        "sigtrace-exit-flush",
    }, report["running"]
    assert set(report["after_first_close"]) == set(report["running"])  # the second app's
    assert report["after_first_close"].count("sigtrace-metrics") == 1
    assert report["after_close"] == []
    assert report["blinker_send"] is True
    assert report["requests_recorded"] == []
    assert report["in_forked_child"] == []
    assert report["after_uninstrument"] == []
    assert exports == 1, "the pusher exported again after close (at exit)"
    assert any(span.name == "GET /" for span in spans)  # flushed at close


def test_the_last_uninstrument_of_the_instrumentor_stops_its_threads() -> None:
    with running_receiver("http/protobuf") as receiver:
        report = run_script(
            SIGTRACE_THREADS,
            """
            import json
            import blinker
            from sigtrace.instrumentor import BlinkerInstrumentor

            blinker_send = blinker.Signal.send
            instrumentor = BlinkerInstrumentor()
            instrumentor.instrument()
            report = {"running": sigtrace_threads()}
            instrumentor.uninstrument()
            report["after"] = sigtrace_threads()
            report["blinker_send"] = blinker.Signal.send is blinker_send
            print(json.dumps(report))
            """,
            OTEL_METRICS_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_METRIC_EXPORT_INTERVAL="600000",
            SIGTRACE_METRICS_PORT="0",
        )
        exports = len(receiver.metric_headers)
    assert report["running"] == ["sigtrace-metrics", "sigtrace-otlp-metrics", "sigtrace-tally"]
    assert report["after"] == []
    assert report["blinker_send"] is True
    assert exports == 1  # the last export, at uninstrument; none at exit


def test_close_in_multiprocess_mode_publishes_the_last_values_and_stops_publishing(
    tmp_path: Path,
) -> None:
    """The publisher is one of the things init_app starts: the last close publishes
    its last values and stops its thread; a child forked after close starts none;
    a later init_app publishes again from its first request."""
    directory = tmp_path / "multiproc"
    directory.mkdir(mode=0o700)
    report = run_script(
        """
        import glob, json, os
        from blinker import NamedSignal
        from flask import Flask
        from sigtrace import SigTrace
        """,
        IN_CHILD,
        SIGTRACE_THREADS,
        """
        work = NamedSignal("closing-work")

        def make_app(name):
            app = Flask(name)
            app.route("/")(lambda: work.send() and "ok" or "ok")
            return app

        def published_sends():
            total = 0.0
            for path in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.json")):
                with open(path) as file:
                    document = json.load(file)
                for family in document["families"]:
                    if family["name"] == "sigtrace_signal_sends_total":
                        total += sum(
                            s["value"] for s in family["series"] if s["labels"] == ["closing-work"]
                        )
            return total

        first, second = make_app("first"), make_app("second")
        first_ext, second_ext = SigTrace(first), SigTrace(second)
        for _ in range(3):
            assert first.test_client().get("/").status_code == 200
        report = {"running": sigtrace_threads(), "published_before_close": published_sends()}
        first_ext.close()
        report["after_first_close"] = sigtrace_threads()
        second_ext.close()
        report["after_close"] = sigtrace_threads()
        report["published_at_close"] = published_sends()
        report["in_forked_child"] = in_child(sigtrace_threads)
        third = make_app("third")
        third_ext = SigTrace(third)
        report["before_a_request"] = sigtrace_threads()
        assert third.test_client().get("/").status_code == 200
        report["after_a_request"] = sigtrace_threads()
        third_ext.close()
        report["after_last_close"] = sigtrace_threads()
        report["published_at_last_close"] = published_sends()
        print(json.dumps(report))
        """,
        PROMETHEUS_MULTIPROC_DIR=str(directory),
        SIGTRACE_PUBLISH_INTERVAL="60",  # only the closes publish
    )
    assert report["running"] == ["sigtrace-publisher", "sigtrace-tally"]
    assert report["published_before_close"] == 0.0
    assert report["after_first_close"] == report["running"]  # the second app's
    assert report["after_close"] == []
    assert report["published_at_close"] == 3.0
    assert report["in_forked_child"] == []
    assert report["before_a_request"] == ["sigtrace-tally"]  # publishing starts at a request
    assert report["after_a_request"] == ["sigtrace-publisher", "sigtrace-tally"]
    assert report["after_last_close"] == []
    assert report["published_at_last_close"] == 4.0
