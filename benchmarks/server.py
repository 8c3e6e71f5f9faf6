"""Real-server run: gunicorn serving the signup app, bare vs with sigtrace, under load.

gunicorn (2 gthread workers, 127.0.0.1, a free port) runs one server per mode;
all of them start first, then rounds interleave bounded load runs against each
in turn. The load generator is ``wrk`` when installed (Debian's package),
else a small Python one (threads with keep-alive ``http.client``
connections), which saturates sooner: its figures are lower and the ratio is
the comparable number. On a 2-core machine the load generator shares the CPU
with the server, so requests/second is a whole-machine figure.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as t

from . import apps
from .worker import REPO_ROOT, clean_env

__all__ = ["MODES", "load_generator", "run"]

MODES: tuple[str, ...] = ("bare", "sigtrace-metrics", "sigtrace-full")
WORKERS = 2
THREADS = 4
CONNECTIONS = 8


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def load_generator() -> str:
    """``wrk`` when installed, else ``python``."""
    return "wrk" if shutil.which("wrk") else "python"


class Gunicorn:
    """One gunicorn master (and its workers) serving ``mode``; stop() always cleans up."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = free_port()
        # Closed in stop(): it lives as long as the server.
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        env = clean_env()
        env["BENCH_MODE"] = mode
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "gunicorn",
                "--workers", str(WORKERS), "--worker-class", "gthread",
                "--threads", str(THREADS),
                "--bind", f"127.0.0.1:{self.port}",
                "--log-level", "warning", "--graceful-timeout", "3",
                "benchmarks.wsgi:app",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{apps.SIGNUP_PATH}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until both workers answer 200 (each worker imports the app on its own)."""
        deadline = time.monotonic() + timeout
        answered = 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn ({self.mode}) exited:\n{self.log()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", apps.SIGNUP_PATH)
                status = conn.getresponse().status
                conn.close()
                if status != 200:
                    raise RuntimeError(f"gunicorn ({self.mode}) answered {status}:\n{self.log()}")
                answered += 1
                if answered >= 20:
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"gunicorn ({self.mode}) not ready in {timeout:.0f} s:\n{self.log()}")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the master's worker processes.

        Independent of how the CPU was shared with the load generator and other
        processes, so CPU per request is the steadier figure on a busy machine.
        """
        total = 0
        for pid in _children(self.proc.pid):
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited meanwhile
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
        return total / _CLOCK_TICKS

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()[-4000:]

    def stop(self) -> None:
        """Terminate the master (which stops its workers); kill all of them if it hangs."""
        workers = _children(self.proc.pid)
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            for pid in [self.proc.pid, *workers]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        finally:
            self._log.close()


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                pids.extend(int(p) for p in f.read().split())
    except OSError:
        return []
    return pids


def _wrk(server: Gunicorn, seconds: float) -> dict[str, t.Any]:
    duration = max(1, round(seconds))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}s", "--timeout", "2s", server.url],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    total = re.search(r"(\d+) requests in", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)) if total else None,
        "errors": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else None,
    }


def _python_load(server: Gunicorn, seconds: float) -> dict[str, t.Any]:
    port = server.port
    deadline = time.monotonic() + seconds
    counts = [0] * CONNECTIONS
    errors = [0] * CONNECTIONS

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            while time.monotonic() < deadline:
                try:
                    conn.request("GET", apps.SIGNUP_PATH)
                    response = conn.getresponse()
                    response.read()
                    if response.status == 200:
                        counts[i] += 1
                    else:
                        errors[i] += 1
                except (OSError, http.client.HTTPException):
                    errors[i] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CONNECTIONS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 15)
    elapsed = time.monotonic() - started
    return {
        "rps": sum(counts) / elapsed,
        "requests": sum(counts) + sum(errors),
        "errors": sum(errors),
        "socket_errors": None,
    }


def load(server: Gunicorn, seconds: float, generator: str) -> dict[str, t.Any]:
    """Drive ``server`` for ``seconds``; requests/second, errors, server CPU per request."""
    cpu_before = server.cpu_seconds()
    result = (_wrk if generator == "wrk" else _python_load)(server, seconds)
    cpu = server.cpu_seconds() - cpu_before
    done = result["requests"]
    result["cpu_us_per_request"] = cpu / done * 1e6 if done and cpu > 0 else None
    return result


def run(
    seconds: float,
    rounds: int,
    warmup_seconds: float = 1.0,
    modes: t.Sequence[str] = MODES,
    generator: str | None = None,
) -> dict[str, t.Any]:
    """Requests/second per mode (median over rounds) and the ratio to bare.

    ``generator``: ``wrk`` or ``python``; by default wrk when installed.
    """
    generator = generator or load_generator()
    servers: dict[str, Gunicorn] = {}
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu_samples: dict[str, list[float]] = {mode: [] for mode in modes}
    errors: dict[str, int] = dict.fromkeys(modes, 0)
    try:
        for mode in modes:
            servers[mode] = Gunicorn(mode)
        for server in servers.values():
            server.wait_ready()
        if warmup_seconds > 0:
            for server in servers.values():
                load(server, warmup_seconds, generator)
        order = list(modes)
        for r in range(rounds):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            for mode in rotated:
                result = load(servers[mode], seconds, generator)
                samples[mode].append(result["rps"])
                if result["cpu_us_per_request"] is not None:
                    cpu_samples[mode].append(result["cpu_us_per_request"])
                errors[mode] += result["errors"]
    finally:
        for server in servers.values():
            server.stop()
    results: dict[str, t.Any] = {
        mode: {
            "median_rps": statistics.median(v),
            "rounds_rps": v,
            "cpu_us_per_request": statistics.median(cpu_samples[mode])
            if cpu_samples[mode]
            else None,
            "rounds_cpu_us_per_request": cpu_samples[mode],
            "errors": errors[mode],
        }
        for mode, v in samples.items()
    }
    if "bare" in results:
        bare = results["bare"]
        for entry in results.values():
            entry["ratio_to_bare"] = entry["median_rps"] / bare["median_rps"]
            if entry["cpu_us_per_request"] and bare["cpu_us_per_request"]:
                entry["cpu_ratio_to_bare"] = (
                    entry["cpu_us_per_request"] / bare["cpu_us_per_request"]
                )
    return {
        "generator": generator,
        "server": f"gunicorn gthread, {WORKERS} workers x {THREADS} threads, 127.0.0.1",
        "connections": CONNECTIONS,
        "seconds": seconds,
        "rounds": rounds,
        "modes": results,
    }
