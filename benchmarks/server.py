"""Real-server run, small and hand-made: gunicorn serving the signup app under load.

As the README tells users to run it: 2 sync workers, ``PROMETHEUS_MULTIPROC_DIR``
a fresh directory, sigtrace's hooks; prometheus-flask-exporter with its own
gunicorn class as the peer (``benchmarks/gunicorn_conf.py``). Load from
another process on 127.0.0.1: ``wrk`` when installed, else threads of urllib.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
import urllib.request
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from . import apps

MODES = ("bare", "pfe-mp", "sigtrace-metrics-mp", "sigtrace-full-mp")
REPO_ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 8
COMMAND = ["-m", "gunicorn", "-c", "benchmarks/gunicorn_conf.py", "benchmarks.apps:wsgi_app()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gunicorn:
    """A gunicorn master serving ``mode`` on a free port; ``stop()`` ends it and its workers."""

    def __init__(self, mode: str) -> None:
        self.mode, self.port = mode, _free_port()
        self.dir = tempfile.mkdtemp(prefix="sigtrace-bench-gunicorn-")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGTRACE_", "OTEL_"))}
        env.update(
            BENCH_MODE=mode, BENCH_BIND=f"127.0.0.1:{self.port}", PROMETHEUS_MULTIPROC_DIR=self.dir
        )
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, *COMMAND], cwd=REPO_ROOT, env=env, stdout=self.log, stderr=self.log
        )

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.get(apps.SIGNUP_PATH)[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.log.seek(0)
        raise RuntimeError(f"gunicorn ({self.mode}) not serving:\n{self.log.read()[-3000:]!r}")

    def worker_cpu(self) -> float:
        """CPU seconds (user + system) used so far by the master's worker processes."""
        total = 0.0
        for worker in psutil.Process(self.proc.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):  # exited meanwhile
                total += sum(worker.cpu_times()[:2])
        return total

    def counted(self) -> int | None:
        """Signup requests in a scrape of ``/metrics`` (every worker's, summed), or None."""
        if self.mode == "bare":
            return None
        prefix = "flask" if self.mode.startswith("pfe") else "sigtrace"
        sample = f"{prefix}_http_request_duration_seconds_count"
        return int(apps.count_samples(self.get("/metrics")[1].decode(), [sample])[sample])

    def stop(self) -> None:
        self.proc.terminate()  # the master stops its workers
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wrk(port: int, seconds: float) -> tuple[int, int]:
    """(responses, errors) from ``wrk`` run for ``seconds``."""
    url = f"http://127.0.0.1:{port}{apps.SIGNUP_PATH}"
    args = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--timeout=2s", url]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30).stdout
    done = re.search(r"(\d+) requests in", out)
    if done is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    # "Non-2xx or 3xx responses: N", "Socket errors: connect N, read N, write N, timeout N"
    errors = re.findall(r"(?:responses:|connect|read|write|timeout) (\d+)", out)
    return int(done.group(1)), sum(int(n) for n in errors)


def _python_load(port: int, seconds: float) -> tuple[int, int]:
    """(responses, errors) from threads of ``urllib`` (sync workers close each connection)."""
    deadline, url = time.monotonic() + seconds, f"http://127.0.0.1:{port}{apps.SIGNUP_PATH}"
    counts = [[0, 0] for _ in range(CONNECTIONS)]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy

    def client(count: list[int]) -> None:
        while time.monotonic() < deadline:
            try:
                with opener.open(url, timeout=5) as response:
                    response.read()
                    count[0] += 1
            except OSError:  # HTTPError (non-2xx) included
                count[1] += 1

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in counts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 10)
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def run(seconds: float, rounds: int, modes: tuple[str, ...] = MODES) -> dict[str, t.Any]:
    """Per mode: requests/second and worker CPU µs per request (medians over rounds)."""
    generator = "wrk" if shutil.which("wrk") else "python"
    load = _wrk if generator == "wrk" else _python_load
    servers = {mode: Gunicorn(mode) for mode in modes}
    results: dict[str, dict[str, t.Any]] = {
        m: {"rps": [], "cpu_us": [], "errors": 0, "requests": 0} for m in modes
    }
    try:
        for server in servers.values():
            server.wait_ready()
            load(server.port, 1)  # warm-up
        for r in range(rounds):  # interleaved, in rotating order
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                server, entry = servers[mode], results[mode]
                cpu, started = server.worker_cpu(), time.monotonic()
                done, errors = load(server.port, seconds)
                elapsed, cpu = time.monotonic() - started, server.worker_cpu() - cpu
                entry["rps"].append(done / elapsed)
                entry["cpu_us"].append(cpu / done * 1e6 if done else float("nan"))
                entry["errors"] += errors
                entry["requests"] += done
        time.sleep(1.5)  # multiprocess values may be published once a second
        for mode, server in servers.items():
            results[mode]["counted_by_metrics"] = server.counted()
    finally:
        for server in servers.values():
            server.stop()
    for entry in results.values():
        entry["median_rps"] = statistics.median(entry["rps"])
        entry["median_cpu_us"] = statistics.median(entry["cpu_us"])
    return {
        "generator": generator,
        "connections": CONNECTIONS,
        "seconds": seconds,
        "rounds": rounds,
        "modes": results,
    }
