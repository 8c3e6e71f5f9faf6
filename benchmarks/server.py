"""Real server, small and hand-made: gunicorn serving the signup app as docs/multiprocess.md tells
users to run it (``gunicorn_conf.py``), under load from ``wrk`` or else urllib threads."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import typing as t
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from . import apps

MODES = (
    "bare", "pfe-mp", "otel", "sigtrace-metrics-mp", "sigtrace-full-mp", "sigtrace-slow-mp",
    "sigtrace-none-mp",
)  # fmt: skip
UNCOUNTED = ("bare", "otel")  # no /metrics to count requests with
CONNECTIONS = 8
TARGETS = {"sigtrace-slow-mp": 1.25}  # a worker's CPU (and instructions) per request over bare's
_OPEN = urllib.request.build_opener(urllib.request.ProxyHandler({})).open  # never a proxy


class Gunicorn:
    """A gunicorn master serving ``mode`` on a free port; ``stop()`` ends it and its workers."""

    def __init__(self, mode: str, prefix: t.Sequence[str] = (), workers: int = 2) -> None:
        """``prefix``: what runs gunicorn (valgrind, for ``instructions.py``)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.mode, self.port = mode, s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = tempfile.mkdtemp(prefix="sigtrace-bench-gunicorn-")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGTRACE_", "OTEL_"))}
        env.update(BENCH_MODE=mode, BENCH_BIND=self.url[7:], PROMETHEUS_MULTIPROC_DIR=self.dir)
        env.update(BENCH_WORKERS=str(workers), PYTHONHASHSEED="0")
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        conf = ["-c", "benchmarks/gunicorn_conf.py", "benchmarks.apps:wsgi_app()"]
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "gunicorn", *conf],
            cwd=Path(__file__).parent.parent, env=env, stdout=self.log, stderr=self.log,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60) -> None:
        deadline, url = time.monotonic() + timeout, self.url + apps.SIGNUP_PATH
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(OSError), _OPEN(url, timeout=5) as response:
                if response.status == 200:
                    return
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
        """Signup requests in one scrape of ``/metrics`` (every worker's, summed)."""
        if self.mode in UNCOUNTED:
            return None
        prefix = "flask" if self.mode.startswith("pfe") else "sigtrace"
        name = f"{prefix}_http_request_duration_seconds_count"
        with _OPEN(self.url + "/metrics", timeout=5) as response:
            return int(apps.count_samples(response.read().decode(), [name])[name])

    def worker_pids(self) -> list[int]:
        return [worker.pid for worker in psutil.Process(self.proc.pid).children()]

    def stop(self, timeout: float = 15) -> None:
        self.proc.terminate()  # the master stops its workers
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wrk(url: str, seconds: float) -> tuple[int, int]:
    """(responses, errors) from ``wrk`` run for ``seconds``."""
    args = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--timeout=2s", url]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30).stdout
    done = re.search(r"(\d+) requests in", out)
    if done is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    # "Non-2xx or 3xx responses: N", "Socket errors: connect N, read N, write N, timeout N"
    errors = re.findall(r"(?:responses:|connect|read|write|timeout) (\d+)", out)
    return int(done.group(1)), sum(int(n) for n in errors)


def _python_load(url: str, seconds: float) -> tuple[int, int]:
    """(responses, errors) from threads of urllib (sync workers close each connection)."""
    deadline = time.monotonic() + seconds

    def client(_: int) -> tuple[int, int]:
        done = errors = 0
        while time.monotonic() < deadline:
            try:
                with _OPEN(url, timeout=5) as response:
                    response.read()
                done += 1
            except OSError:  # HTTPError (non-2xx) included
                errors += 1
        return done, errors

    with ThreadPoolExecutor(CONNECTIONS) as pool:
        counts = list(pool.map(client, range(CONNECTIONS)))
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def run(
    seconds: float, rounds: int, modes: tuple[str, ...] = MODES, workers: int = 2
) -> dict[str, t.Any]:
    """Per mode: requests/second and worker CPU µs per request (medians over rounds)."""
    generator = "wrk" if shutil.which("wrk") else "python"
    load = _wrk if generator == "wrk" else _python_load
    servers = {mode: Gunicorn(mode, workers=workers) for mode in modes}
    results: dict[str, dict[str, t.Any]] = {
        m: {"rps": [], "cpu_us": [], "errors": 0, "requests": 0} for m in modes
    }
    try:
        for server in servers.values():
            server.wait_ready()
            load(server.url + apps.SIGNUP_PATH, 1)  # warm-up
        for r in range(rounds):  # interleaved, in rotating order
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                server, entry = servers[mode], results[mode]
                cpu, started = server.worker_cpu(), time.monotonic()
                done, errors = load(server.url + apps.SIGNUP_PATH, seconds)
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
    return {"generator": generator, "connections": CONNECTIONS, "seconds": seconds,
            "rounds": rounds, "workers": workers, "modes": results}  # fmt: skip
