"""Run a test app module in a subprocess (optionally under a wrapper command).

The app prints ``listening on port N`` once it serves; its output is collected
by threads, and it is stopped with SIGTERM (SIGKILL after 10 s) on exit.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
import typing as t
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0  # seconds for the subprocess to import everything and listen


def stop_process(proc: subprocess.Popen[t.Any], timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` (one this test run started), SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


class RunningApp:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.port = 0
        self._proc = proc
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def add(self, stream: list[str], line: str) -> None:
        with self._lock:
            stream.append(line)

    @property
    def stdout(self) -> str:
        with self._lock:
            return "".join(self._stdout)

    @property
    def stderr(self) -> str:
        with self._lock:
            return "".join(self._stderr)

    def get(self, path: str, traceparent: str | None = None) -> tuple[int, float]:
        """GET ``path``; the status and the seconds it took."""
        headers = {"traceparent": traceparent} if traceparent else {}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers)
        started = time.monotonic()
        try:
            with self._opener.open(request, timeout=10) as response:
                response.read()
                status = int(response.status)
        except urllib.error.HTTPError as error:
            error.read()
            status = error.code
        return status, time.monotonic() - started

    def wait_for_stderr(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.stderr}")
            time.sleep(0.05)

    def stop(self) -> float:
        """SIGTERM (SIGKILL after 10 s); the seconds the process took to exit.

        Done again on leaving :func:`run_module`'s block, where it is a no-op."""
        started = time.monotonic()
        stop_process(self._proc)
        took = time.monotonic() - started
        for reader in self._readers:
            reader.join(timeout=5)
        return took


@contextmanager
def run_module(
    module: str, env: dict[str, str], wrapper: Sequence[str] = ()
) -> Iterator[RunningApp]:
    """``[*wrapper, python, -m, module]``; yields once it listens. Output is
    complete once the block has exited (the process has then exited too)."""
    proc = subprocess.Popen(
        [*wrapper, sys.executable, "-m", module],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    app = RunningApp(proc)
    ports: queue.Queue[int] = queue.Queue()
    assert proc.stdout is not None and proc.stderr is not None

    def pump_stdout() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("listening on port "):
                ports.put(int(line.split()[-1]))
            app.add(app._stdout, line)

    def pump_stderr() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            app.add(app._stderr, line)

    app._readers = [threading.Thread(target=f, daemon=True) for f in (pump_stdout, pump_stderr)]
    for reader in app._readers:
        reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not app.port and time.monotonic() < deadline and proc.poll() is None:
            try:
                app.port = ports.get(timeout=0.1)
            except queue.Empty:
                continue
        assert app.port, f"{module} did not start; stderr:\n{app.stderr}"
        yield app
    finally:
        app.stop()
