"""Real gunicorn and uWSGI servers for the tests: start, drive, scrape, stop.

Each server runs ``tests.apps.gunicorn_app:app`` in its own session on
127.0.0.1 port 0 (the port is read from the server's log), with
``PROMETHEUS_MULTIPROC_DIR`` pointing at a fresh directory. Only processes
started here are ever signalled, by pid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as t
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

from tests.conftest import samples_from_text

REPO = Path(__file__).resolve().parents[1]
HTTP_TIMEOUT = 10.0
START_TIMEOUT = 30.0
PUBLISH_DEADLINE = 10.0
"""Upper bound of the polls waiting for published values: the interval (1 s)
plus room for a loaded 2-core machine. Not a timing assertion: the poll
succeeds as soon as the values are there."""

SIGNAL = "gunicorn-signup"
BOOT_SIGNAL = "gunicorn-boot"
RECEIVERS = ("tests.apps.gunicorn_app.send_welcome", "tests.apps.gunicorn_app.count_signup")
Key = tuple[str, tuple[tuple[str, str], ...]]
HTTP_COUNT: Key = (
    "sigtrace_http_request_duration_seconds_count",
    (("endpoint", "signup"), ("method", "GET"), ("status", "200")),
)
SENDS: Key = ("sigtrace_signal_sends_total", (("signal", SIGNAL),))
BOOT_SENDS: Key = ("sigtrace_signal_sends_total", (("signal", BOOT_SIGNAL),))
RECEIVER_COUNTS: list[Key] = [
    ("sigtrace_receiver_duration_seconds_count", (("receiver", r), ("signal", SIGNAL)))
    for r in RECEIVERS
]
TOTALS = [HTTP_COUNT, SENDS, *RECEIVER_COUNTS]
LIVE_WORKERS: Key = ("test_live_workers", ())


def bucket_exemplars(openmetrics_text: str, family: str, **labels: str) -> list[tuple[str, str]]:
    """``(le, trace_id)`` of every exemplar on the buckets of ``family``'s
    series that have ``labels``."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    found = []
    for parsed in text_string_to_metric_families(openmetrics_text):
        if parsed.name != family:
            continue
        for s in parsed.samples:
            if s.name != family + "_bucket" or s.exemplar is None:
                continue
            if all(s.labels.get(k) == v for k, v in labels.items()):
                found.append((s.labels["le"], s.exemplar.labels["trace_id"]))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SIGTRACE_", "OTEL_", "PROMETHEUS_MULTIPROC_DIR"))
    }
    env.update(SIGTRACE_TRACING="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Server:
    """A running server master: its port, multiprocess dir and log."""

    def __init__(
        self, argv: list[str], env: dict[str, str], prometheus_dir: Path, umask: int = -1
    ) -> None:
        self.prometheus_dir = prometheus_dir
        self.log: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            umask=umask,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self.port = 0
        self.metrics_port = 0
        self.headers: dict[str, str] = {}  # sent with every scrape

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
                    log = "\n".join(self.log[-80:])
                    raise AssertionError(f"the server never logged {pattern!r}:\n{log}")
                self._changed.wait(min(left, 0.2))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> dict[str, t.Any]:
        """One request; its JSON answer: the serving worker's pid (and trace id)."""
        with urllib.request.urlopen(self.url(path), timeout=HTTP_TIMEOUT) as r:
            assert r.status == 200
            answer: dict[str, t.Any] = json.load(r)
            return answer

    def signup(self, name: str) -> dict[str, t.Any]:
        return self.get(f"/signup/{name}")

    def load(self, n: int, threads: int = 8, prefix: str = "user") -> list[int]:
        """``n`` requests from ``threads`` clients; the pid that served each."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            return [a["pid"] for a in pool.map(lambda i: self.signup(f"{prefix}{i}"), range(n))]

    def load_every_worker(self, n: int, workers: int = 2, rounds: int = 10) -> list[int]:
        """Rounds of :meth:`load` until ``workers`` processes have served one (an idle
        sync worker may take a whole round alone under load); the pid of each."""
        pids: list[int] = []
        for round_ in range(rounds):
            pids += self.load(n, prefix=f"round{round_}-")
            if len(set(pids)) >= workers:
                return pids
        raise AssertionError(f"{rounds} rounds of {n} requests reached only {set(pids)}")

    def scrape_text(self, port: int | None = None, openmetrics: bool = False) -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port or self.port}/metrics", headers=self.headers
        )
        if openmetrics:
            request.add_header("Accept", "application/openmetrics-text; version=1.0.0")
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return response.read().decode()

    def scrape(self, port: int | None = None) -> dict[Key, float]:
        return samples_from_text(self.scrape_text(port))

    def totals(self, port: int | None = None) -> list[float]:
        samples = self.scrape(port)
        return [samples.get(key, 0.0) for key in TOTALS]

    def wait_for_totals(self, n: float, port: int | None = None) -> None:
        """Poll scrapes until every total is ``n`` (never above it)."""
        seen: list[list[float]] = []

        def reached() -> bool:
            seen.append(self.totals(port))
            assert all(v <= n for v in seen[-1]), (seen[-1], n)
            return seen[-1] == [n] * len(TOTALS)

        try:
            run_until(reached, f"totals of {n}", PUBLISH_DEADLINE)
        except AssertionError as error:
            raise AssertionError(f"{error}; last scrapes: {seen[-3:]}") from None

    def directory_totals(self) -> list[float]:
        """The totals read straight from the directory (as the CLI reads them)."""
        from prometheus_client import CollectorRegistry, generate_latest

        from sigtrace.multiprocess_directory import PublishedTotalsCollector

        registry = CollectorRegistry()
        registry.register(PublishedTotalsCollector(str(self.prometheus_dir), archive=False))
        samples = samples_from_text(generate_latest(registry).decode())
        return [samples.get(key, 0.0) for key in TOTALS]

    def files(self) -> set[str]:
        return {p.name for p in self.prometheus_dir.iterdir()}

    def signal_master(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)  # graceful: the master stops its workers
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only this server
                self.proc.wait(10)
        self._reader.join(5)


GUNICORN_CONF = """\
from sigtrace.gunicorn import child_exit, on_starting, when_ready, worker_exit  # noqa: F401

bind = "127.0.0.1:0"
loglevel = "info"
timeout = 30
graceful_timeout = 5
control_socket_disable = True  # gunicorn >= 24: no control socket under $HOME
"""


def start_gunicorn(
    tmp_path: Path,
    *,
    workers: int = 2,
    conf: str = "",
    args: Iterable[str] = (),
    metrics_port: bool = False,
    prometheus_dir: Path | None = None,
    umask: int = -1,
    **env: str,
) -> Server:
    """gunicorn with sigtrace's hooks; returns once every worker has booted.

    ``prometheus_dir``: an existing directory to use (else a new one in
    ``tmp_path``); ``umask``: the master's (-1: this process's).
    """
    if prometheus_dir is None:
        prometheus_dir = tmp_path / "prometheus"
        prometheus_dir.mkdir()
    conf_path = tmp_path / "gunicorn.conf.py"
    conf_path.write_text(GUNICORN_CONF + f"workers = {workers}\n" + conf)
    port = free_port() if metrics_port else 0
    if metrics_port:
        env["SIGTRACE_METRICS_PORT"] = str(port)
    server = Server(
        [
            *(sys.executable, "-m", "gunicorn", "-c", str(conf_path)),
            *args,
            "tests.apps.gunicorn_app:app",
        ],
        clean_env(PROMETHEUS_MULTIPROC_DIR=str(prometheus_dir), **env),
        prometheus_dir,
        umask,
    )
    try:
        listening = server.wait_for_log(r"Listening at: http://127\.0\.0\.1:(\d+)")
        server.port = int(listening[0].group(1))
        server.wait_for_log(r"Booting worker with pid: \d+", count=workers)
        if metrics_port:
            server.metrics_port = port
            server.wait_for_log(rf"serving all workers' metrics on http://127\.0\.0\.1:{port}")
        run_until(lambda: _answers(server), "the first answer")
    except BaseException:
        server.stop()
        raise
    return server


def start_uwsgi(
    tmp_path: Path,
    *options: str,
    prometheus_dir: Path | None = None,
    multiprocess: bool = True,
    **env: str,
) -> Server:
    """uWSGI (master + workers) serving HTTP itself; returns once it answers.

    ``multiprocess=False``: without ``PROMETHEUS_MULTIPROC_DIR``.
    """
    if prometheus_dir is None:
        prometheus_dir = tmp_path / "prometheus"
        prometheus_dir.mkdir()
    if multiprocess:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(prometheus_dir)
    server = Server(
        [
            *(str(Path(sys.executable).with_name("uwsgi")), "--http-socket", "127.0.0.1:0"),
            *("--module", "tests.apps.gunicorn_app:app", "--home", sys.prefix),
            *("--master", "--die-on-term", "--need-app", "--disable-logging"),
            *options,
        ],
        clean_env(PYTHONPATH=str(REPO), **env),
        prometheus_dir,
    )
    try:
        bound = server.wait_for_log(r"bound to TCP address 127\.0\.0\.1:(\d+)")
        server.port = int(bound[0].group(1))
        run_until(lambda: _answers(server), "the first answer")
    except BaseException:
        server.stop()
        raise
    return server


def _answers(server: Server) -> bool:
    assert server.proc.poll() is None, "\n".join(server.log[-50:])
    try:
        with urllib.request.urlopen(server.url("/health"), timeout=HTTP_TIMEOUT) as r:
            return bool(r.status == 200)
    except OSError:
        return False
