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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


class RunningApp:
    def __init__(self) -> None:
        self.port = 0
        self._lock = threading.Lock()
        self._stdout: list[str] = []
        self._stderr: list[str] = []

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
    app = RunningApp()
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

    readers = [threading.Thread(target=f, daemon=True) for f in (pump_stdout, pump_stderr)]
    for reader in readers:
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
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for reader in readers:
            reader.join(timeout=5)
