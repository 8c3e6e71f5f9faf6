"""A long-lived measuring subprocess per mode, asked for one measurement at a time.

Each mode is set up once in its own process (instrumentations patch globals);
the parent then interleaves rounds over all modes, so slow drifts of the
machine (frequency, neighbours) spread over every mode instead of landing on
one. Idle workers block on stdin and cost nothing.

Protocol: the parent writes one command per line; the worker answers each
with one line ``@@ {json}``. Anything else a worker prints is ignored.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
import typing as t
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["Worker", "clean_env", "serve", "start_all"]

REPO_ROOT = Path(__file__).resolve().parent.parent
_PREFIX = "@@ "

Handler = Callable[[list[str]], Mapping[str, t.Any]]


def clean_env() -> dict[str, str]:
    """The environment without settings that would change what a mode measures."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SIGTRACE_", "OTEL_", "PROMETHEUS_MULTIPROC"))
        and k not in ("prometheus_multiproc_dir", "DEBUG_METRICS")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def serve(handlers: Mapping[str, Handler], ready: Mapping[str, t.Any]) -> None:
    """Worker side: say ``ready``, then answer commands from stdin until ``quit`` or EOF."""
    out = sys.stdout
    out.write(_PREFIX + json.dumps(dict(ready)) + "\n")
    out.flush()
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        try:
            answer = dict(handlers[words[0]](words[1:]))
        except Exception as exc:  # report, keep serving: the parent decides
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(_PREFIX + json.dumps(answer) + "\n")
        out.flush()


class Worker:
    """Parent side: one subprocess running ``python -m module --worker mode``."""

    def __init__(self, module: str, mode: str, *extra: str) -> None:
        self.mode = mode
        # A file, not a pipe: a chatty worker must never block on a full stderr pipe.
        # Closed in close(): it lives as long as the worker.
        self._stderr_file = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--worker", mode, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            text=True,
            cwd=REPO_ROOT,
            env=clean_env(),
        )

    def ask(self, command: str, timeout: float = 120.0) -> dict[str, t.Any]:
        """Send one command and wait for its answer (raises on error or timeout)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def read(self, timeout: float) -> dict[str, t.Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"worker {self.mode!r} did not answer in {timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.mode!r} exited:\n{self._stderr()}")
            if line.startswith(_PREFIX):
                answer: dict[str, t.Any] = json.loads(line[len(_PREFIX) :])
                if "error" in answer:
                    raise RuntimeError(f"worker {self.mode!r}: {answer['error']}")
                return answer

    def _stderr(self) -> str:
        try:
            self.proc.wait(timeout=5)
            self._stderr_file.seek(0)
            return self._stderr_file.read()[-4000:]
        except Exception:
            return "(no stderr)"

    def close(self) -> None:
        """Stop the worker: ``quit``, then terminate, then kill."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._stderr_file.close()


def start_all(module: str, modes: t.Iterable[str], *extra: str) -> dict[str, Worker]:
    """Start one worker per mode in parallel; return once each has said it is ready."""
    workers = {mode: Worker(module, mode, *extra) for mode in modes}
    try:
        for worker in workers.values():
            worker.read(timeout=120)
    except BaseException:
        for worker in workers.values():
            worker.close()
        raise
    return workers
