"""The benchmarks run end to end, very briefly (``python -m benchmarks.run --smoke``).

No timing is asserted. Each mode checks before it is timed that it recorded
what it claims (metric samples in a real scrape of ``/metrics``, spans at the
exporter, no span under an unsampled parent) and fails its worker otherwise;
here every benchmark must report a number and every server serve without errors.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyperf  # type: ignore[import-untyped]

from benchmarks import apps, instructions, per_send, server
from tests.conftest import require_tool

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, only: str) -> str:
    # Its own process group: on a timeout, pyperf's workers and gunicorn go too.
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--only", only,
         "--results-dir", str(tmp_path)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == 0, out[-4000:]
    return out


def _values(path: Path) -> dict[str, list[float]]:
    suite = pyperf.BenchmarkSuite.load(str(path))
    return {bench.get_name(): bench.get_values() for bench in suite.get_benchmarks()}


def test_pyperf_benchmarks_report_every_mode(tmp_path: Path) -> None:
    out = _run(tmp_path, "per-send,per-request")

    sends = _values(tmp_path / "per_send.json")
    assert set(sends) == {f"send {mode} {n}" for mode, n in per_send.BENCHMARKS}
    requests = _values(tmp_path / "per_request.json")
    assert set(requests) == {f"request {mode}" for mode in apps.MODES}
    assert all(v and all(x > 0 for x in v) for v in [*sends.values(), *requests.values()])
    summary = (tmp_path / "summary.md").read_text()
    for line in ("| sigtrace metrics-only / pfe |", "| the same, multiprocess |",
                 "| sigtrace full / floor |", "| sigtrace slow / full |", "| 10, unsampled |",
                 "load average"):  # fmt: skip
        assert line in summary and line in out, line


def test_server_run_serves_every_mode_without_errors(tmp_path: Path) -> None:
    _run(tmp_path, "server")

    result = json.loads((tmp_path / "server.json").read_text())
    assert set(result["modes"]) == {
        "bare", "pfe-mp", "otel", "sigtrace-metrics-mp", "sigtrace-full-mp",
        "sigtrace-slow-mp", "sigtrace-none-mp",
    }  # fmt: skip
    for mode, entry in result["modes"].items():
        assert entry["errors"] == 0, mode
        assert entry["median_rps"] > 0 and entry["median_cpu_us"] > 0, mode
        if mode not in server.UNCOUNTED:  # both workers' requests, from the multiprocess files
            assert entry["counted_by_metrics"] >= entry["requests"] > 0, mode


def test_instruction_counts_per_request_under_callgrind() -> None:
    """``benchmarks.instructions`` counts a request's instructions under valgrind: the
    difference of two runs (1 and 3 requests after the same warm-up), of a plausible
    size for one request to bare Flask (hundreds of thousands)."""
    require_tool("valgrind", "valgrind")
    assert 100_000 < _direct_bare() < 2_000_000


@functools.cache
def _direct_bare() -> float:
    """A direct request's count to bare Flask (counted once for both tests)."""
    return instructions.per_request("bare", 1, 3)


def test_a_gunicorn_workers_instruction_counts_per_request_under_callgrind() -> None:
    """``benchmarks.instructions --server`` counts what a gunicorn worker, started under
    valgrind, spends on one request: the difference of two runs (2 and 6 requests over
    real HTTP), more than a direct call to Flask costs (the worker also accepts, parses
    and answers), and the worker and master stopped after each."""
    require_tool("valgrind", "valgrind")
    direct = _direct_bare()
    assert direct < instructions.server_per_request("bare", 2, 6) < 5 * direct
