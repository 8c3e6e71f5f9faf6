"""Real gunicorn, two sync workers, multiprocess metrics: the counts add up.

gunicorn runs ``tests.apps.gunicorn_app:app`` with a ``gunicorn.conf.py`` that
imports sigtrace's hooks exactly as the module docs tell users to, binds
127.0.0.1 port 0 (the master logs the port it got) and serves the separate
exposition server from the master on a free port.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import samples_from_text

pytest.importorskip("gunicorn", reason="gunicorn is a dev dependency: pip install -e '.[dev]'")
if sys.platform == "win32":  # pragma: no cover
    pytest.skip("gunicorn does not run on Windows", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
HTTP_TIMEOUT = 10.0
START_TIMEOUT = 30.0

CONF = """\
from sigtrace.gunicorn import child_exit, when_ready  # noqa: F401

bind = "127.0.0.1:0"
workers = 2
worker_class = "sync"
loglevel = "info"
timeout = 30
graceful_timeout = 3
# gunicorn >= 24 opens a control socket under $HOME by default; older ones
# ignore this unknown name.
control_socket_disable = True
"""

SIGNAL = "gunicorn-signup"
RECEIVERS = ("tests.apps.gunicorn_app.send_welcome", "tests.apps.gunicorn_app.count_signup")
Key = tuple[str, tuple[tuple[str, str], ...]]
HTTP_COUNT: Key = (
    "sigtrace_http_request_duration_seconds_count",
    (("endpoint", "signup"), ("method", "GET"), ("status", "200")),
)
SENDS: Key = ("sigtrace_signal_sends_total", (("signal", SIGNAL),))
RECEIVER_COUNTS: list[Key] = [
    ("sigtrace_receiver_duration_seconds_count", (("receiver", r), ("signal", SIGNAL)))
    for r in RECEIVERS
]
TOTALS = [HTTP_COUNT, SENDS, *RECEIVER_COUNTS]
LIVE_WORKERS: Key = ("test_live_workers", ())


class Gunicorn:
    """A running gunicorn master: its ports, multiprocess dir and log."""

    def __init__(self, proc: subprocess.Popen[str], prometheus_dir: Path) -> None:
        self.proc = proc
        self.prometheus_dir = prometheus_dir
        self.log: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self.port = 0
        self.metrics_port = 0

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.log.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for_log(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        deadline = time.monotonic() + START_TIMEOUT
        with self._changed:
            while True:
                found = [m for line in self.log if (m := re.search(pattern, line))]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    log = "\n".join(self.log)
                    raise AssertionError(f"gunicorn never logged {pattern!r}:\n{log}")
                self._changed.wait(min(left, 0.2))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def signup(self, name: str) -> int:
        """One request; the pid of the worker that served it."""
        with urllib.request.urlopen(self.url(f"/signup/{name}"), timeout=HTTP_TIMEOUT) as r:
            assert r.status == 200
            pid: int = json.load(r)["pid"]
            return pid

    def scrape(self, port: int | None = None) -> dict[Key, float]:
        url = f"http://127.0.0.1:{port or self.port}/metrics"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            return samples_from_text(response.read().decode())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # graceful: the master stops its workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only gunicorn
                self.proc.wait(10)
        self._reader.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Gunicorn]:
    prometheus_dir = tmp_path / "prometheus"
    prometheus_dir.mkdir()
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(CONF)
    metrics_port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SIGTRACE_", "OTEL_", "PROMETHEUS_MULTIPROC_DIR"))
    }
    env.update(
        PROMETHEUS_MULTIPROC_DIR=str(prometheus_dir),
        SIGTRACE_TRACING="false",
        SIGTRACE_METRICS_PORT=str(metrics_port),
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(conf), "tests.apps.gunicorn_app:app"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    server = Gunicorn(proc, prometheus_dir)
    try:
        # Port 0: gunicorn logs the port the kernel picked.
        listening = server.wait_for_log(r"Listening at: http://127\.0\.0\.1:(\d+)")
        server.port = int(listening[0].group(1))
        assert server.port != 0
        server.metrics_port = metrics_port
        server.wait_for_log(r"Booting worker with pid: \d+", count=2)
        server.wait_for_log(rf"serving all workers' metrics on http://127\.0\.0\.1:{metrics_port}")
        yield server
    finally:
        server.stop()


def run_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_scrapes_from_either_worker_total_every_request(gunicorn: Gunicorn) -> None:
    n = 200
    with ThreadPoolExecutor(8) as pool:
        pids = list(pool.map(lambda i: gunicorn.signup(f"user{i}"), range(n)))
    by_worker = {pid: pids.count(pid) for pid in set(pids)}
    assert len(by_worker) == 2 and all(count < n for count in by_worker.values()), by_worker

    # Each scrape lands on either worker; each must see both workers' requests.
    scrapes = [gunicorn.scrape() for _ in range(6)]
    scrapes.append(gunicorn.scrape(gunicorn.metrics_port))  # the master's server
    for samples in scrapes:
        assert [samples.get(key) for key in TOTALS] == [n] * len(TOTALS)
        assert samples.get(LIVE_WORKERS) == 2
    # Scrapes are not requests: /metrics is never timed.
    assert not any(
        name == HTTP_COUNT[0] and ("endpoint", "sigtrace_metrics") in labels
        for name, labels in scrapes[-1]
    )


def test_totals_stay_monotonic_when_a_worker_is_killed(gunicorn: Gunicorn) -> None:
    lock = threading.Lock()
    ok: list[int] = []  # pid of the worker that served each successful request
    failed: list[BaseException] = []
    history: list[list[float]] = []  # totals of each successful scrape, in order
    stop = threading.Event()

    def client(prefix: str) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                pid = gunicorn.signup(f"{prefix}-{i}")
            except Exception as exc:  # the killed worker's request in flight
                with lock:
                    failed.append(exc)
                continue
            with lock:
                ok.append(pid)

    def scraper() -> None:
        while not stop.is_set():
            try:
                samples = gunicorn.scrape()
            except Exception:
                continue  # served by the worker being killed
            history.append([samples.get(key, 0.0) for key in TOTALS])
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(f"c{i}",)) for i in range(4)]
    threads.append(threading.Thread(target=scraper))
    for thread in threads:
        thread.start()
    try:
        run_until(lambda: len(set(ok)) == 2 and len(ok) >= 100, "both workers serving")
        workers = set(ok)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        # gunicorn forks a replacement; wait until it has served requests too.
        run_until(lambda: len(set(ok) - workers) >= 1, "the replacement worker", timeout=25)
        mark = len(ok)
        run_until(lambda: len(ok) >= mark + 100, "traffic after the restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join(HTTP_TIMEOUT + 5)
    assert not any(thread.is_alive() for thread in threads)

    final = gunicorn.scrape()
    successes = len(ok)
    # A sync worker serves one request at a time: at most one was cut off. It
    # may have been recorded before the kill, so it may or may not count.
    assert len(failed) <= 1, failed
    for key in TOTALS:
        assert successes <= final[key] <= successes + len(failed), (key, final[key], successes)
    assert len(history) >= 10
    for earlier, later in itertools.pairwise(history):
        assert all(a <= b for a, b in zip(earlier, later, strict=True)), (earlier, later)
    assert all(a <= b for a, b in zip(history[-1], [final[k] for k in TOTALS], strict=True))

    # child_exit ran mark_process_dead: the victim's live gauge file is gone,
    # its counters stay (that is what keeps the totals monotonic).
    assert gunicorn.wait_for_log(rf"Worker \(pid:{victim}\) was sent SIGKILL")
    files = {p.name for p in gunicorn.prometheus_dir.iterdir()}
    assert f"gauge_livesum_{victim}.db" not in files
    assert f"counter_{victim}.db" in files
    assert final[LIVE_WORKERS] == 2


class _Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str, *args: object) -> None:
        self.warnings.append(message % args)

    def info(self, message: str, *args: object) -> None:
        raise AssertionError("no server expected: " + message % args)


class _Arbiter:
    def __init__(self) -> None:
        self.log = _Log()


@pytest.mark.parametrize(
    ("env", "warning"),
    [
        ({"SIGTRACE_METRICS_PORT": "0", "PROMETHEUS_MULTIPROC_DIR": "."}, "fixed port"),
        ({"SIGTRACE_METRICS_PORT": "9999"}, "needs PROMETHEUS_MULTIPROC_DIR"),
        ({"PROMETHEUS_MULTIPROC_DIR": "."}, None),
    ],
)
def test_when_ready_starts_no_server_it_cannot_use(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], warning: str | None
) -> None:
    from sigtrace.gunicorn import when_ready

    for key in ("SIGTRACE_METRICS_PORT", "PROMETHEUS_MULTIPROC_DIR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    arbiter = _Arbiter()
    when_ready(arbiter)
    if warning is None:
        assert arbiter.log.warnings == []
    else:
        assert len(arbiter.log.warnings) == 1 and warning in arbiter.log.warnings[0]
