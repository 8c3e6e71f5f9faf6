"""What the figures were measured on: CPU, cores, Python, package versions."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import typing as t
from importlib import metadata

from .worker import REPO_ROOT

__all__ = ["PACKAGES", "describe"]

PACKAGES: tuple[str, ...] = (
    "sigtrace",
    "flask",
    "werkzeug",
    "blinker",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-flask",
    "prometheus-client",
    "prometheus-flask-exporter",
    "gunicorn",
    "pyinstrument",
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _run(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def describe() -> dict[str, t.Any]:
    """The machine and software the run measured."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    wrk = shutil.which("wrk")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": affinity,
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": {name: _version(name) for name in PACKAGES},
        "wrk": _run([wrk, "--version"]) if wrk else None,
        # Read-only: which commit of sigtrace was measured (changes may be uncommitted).
        "commit": _run(["git", "rev-parse", "--short", "HEAD"]),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "sigtrace_c_histogram": _speedups(),
    }


def _speedups() -> bool:
    """Whether sigtrace's C histogram (sigtrace._speedups) was built."""
    from sigtrace import metrics

    return metrics.SPEEDUPS
