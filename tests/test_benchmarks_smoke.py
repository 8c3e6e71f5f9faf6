"""The benchmark harness runs end to end in a tiny configuration.

No timing is asserted: only that every section runs, prints its table and
writes JSON, and that each mode measured what it claims to (spans per
request, metric samples per request, spans per sampled send, server errors).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import typing as t
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "--rounds", "1", "--requests", "20", "--warmup", "20",
    "--send-rounds", "1", "--send-ms", "1",
    "--server-seconds", "1", "--server-rounds", "1", "--server-warmup", "0",
    "--profile-requests", "30",
]  # fmt: skip


def _run(tmp_path: Path, *args: str) -> tuple[str, dict[str, t.Any]]:
    # Its own process group: on a timeout, the harness's workers and gunicorn
    # servers (all in that group) are killed with it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run", *TINY, "--results-dir", str(tmp_path), *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out = err = ""
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        # Also reaps stragglers of a run that died before stopping its children.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            proc.communicate(timeout=10)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    return out, results


def test_direct_sections_print_tables_and_measure_what_they_claim(tmp_path: Path) -> None:
    out, results = _run(tmp_path, "--only", "per-request,per-send,profile")

    assert "machine:" in out and "python:" in out and "opentelemetry-sdk" in out
    for mode in ("bare", "pfe", "otel", "otel+pfe", "floor", "sigtrace-metrics", "sigtrace-full"):
        assert f"\n{mode} " in out
    assert "overhead sigtrace-metrics / pfe" in out
    assert "overhead sigtrace-full / floor" in out
    assert "no receivers, unsampled parent" in out
    assert "top functions by own time" in out

    modes = results["per_request"]["modes"]
    assert modes["floor"]["spans_per_request"] == 5.0
    assert modes["sigtrace-full"]["spans_per_request"] == 5.0
    assert modes["otel"]["spans_per_request"] == 1.0
    assert modes["sigtrace-metrics"]["spans_per_request"] is None
    for mode in ("pfe", "otel+pfe", "sigtrace-metrics", "sigtrace-full"):
        assert modes[mode]["recorded_per_request"] == 1.0, mode
    for mode in ("sigtrace-metrics", "sigtrace-full"):
        assert modes[mode]["receivers_per_request"] == 3.0, mode
    assert all(m["median_us"] > 0 for m in modes.values())

    sends = results["per_send"]["modes"]
    assert sends["sigtrace-sampled"]["spans_exported_fraction"] == 1.0
    assert sends["sigtrace-unsampled"]["spans_exported_fraction"] == 0.0
    assert set(sends["bare"]) >= {"0", "1", "3", "10"}

    profile = results["profile"]
    assert set(profile) == {"bare", "sigtrace-metrics", "sigtrace-full"}
    assert profile["sigtrace-full"]["per_package_us"]["sigtrace"] > 0


def test_server_section_serves_every_mode_without_errors(tmp_path: Path) -> None:
    out, results = _run(tmp_path, "--only", "server")

    assert "Real server: gunicorn" in out
    server = results["server"]
    assert set(server["modes"]) == {"bare", "sigtrace-metrics", "sigtrace-full"}
    for mode, entry in server["modes"].items():
        assert entry["errors"] == 0, mode
        assert entry["median_rps"] > 0, mode
