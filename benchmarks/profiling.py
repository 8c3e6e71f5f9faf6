"""Where the time goes: cProfile (and pyinstrument, when installed) per mode.

Each mode is profiled in its own subprocess over the same direct-WSGI request
loop as :mod:`benchmarks.per_request`. The report gives the top functions by
own time (``tottime``) and the own time summed per package, so what sigtrace
adds is visible next to Flask's and the OpenTelemetry SDK's share. Profiled
runs are slower than real ones (cProfile's hooks cost per call): read shares,
not absolute figures.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
import typing as t

from . import apps
from .worker import REPO_ROOT, clean_env

__all__ = ["MODES", "run"]

MODES: tuple[str, ...] = ("bare", "sigtrace-metrics", "sigtrace-full")
TOP = 25

# Path fragments to package names, first match wins.
_PACKAGES = (
    ("/sigtrace/", "sigtrace"),
    ("/opentelemetry/sdk/", "opentelemetry-sdk"),
    ("/opentelemetry/", "opentelemetry-api"),
    ("/prometheus_client/", "prometheus-client"),
    ("/flask/", "flask"),
    ("/werkzeug/", "werkzeug"),
    ("/blinker/", "blinker"),
    ("/benchmarks/", "benchmark app + loop"),
    ("/contextvars", "contextvars"),
)


def _package(filename: str) -> str:
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins (C calls)"
    for fragment, name in _PACKAGES:
        if fragment in filename:
            return name
    return "stdlib/other"


def _profile(mode: str, requests: int) -> dict[str, t.Any]:
    from werkzeug.test import EnvironBuilder

    state = apps.build(mode)
    app: t.Any = state.app  # called as a plain WSGI callable
    environ = EnvironBuilder(path=apps.SIGNUP_PATH, method="GET").get_environ()

    def start_response(status: str, headers: t.Any, exc_info: t.Any = None) -> None:
        return None

    def loop(n: int) -> None:
        for _ in range(n):
            body = app(environ.copy(), start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()

    loop(min(1000, requests))  # warm-up: caches, metric children, lazy imports
    profiler = cProfile.Profile()
    profiler.enable()
    loop(requests)
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats_map: dict[t.Any, t.Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in stats_map.values())
    per_package: dict[str, float] = {}
    rows = []
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats_map.items():
        package = _package(filename)
        per_package[package] = per_package.get(package, 0.0) + tottime
        where = f"{_short(filename)}:{line}({name})" if not filename.startswith("~") else name
        rows.append(
            {
                "function": where,
                "package": package,
                "calls_per_request": ncalls / requests,
                "tottime_us_per_request": tottime / requests * 1e6,
                "cumtime_us_per_request": cumtime / requests * 1e6,
            }
        )
    rows.sort(key=lambda r: -float(r["tottime_us_per_request"]))
    result: dict[str, t.Any] = {
        "mode": mode,
        "requests": requests,
        "profiled_us_per_request": total / requests * 1e6,
        "per_package_us": {
            k: v / requests * 1e6 for k, v in sorted(per_package.items(), key=lambda kv: -kv[1])
        },
        "top": rows[:TOP],
        "pyinstrument": _pyinstrument(loop, requests),
    }
    return result


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename.replace(str(REPO_ROOT) + "/", "")


def _pyinstrument(loop: t.Callable[[int], None], requests: int) -> str | None:
    try:
        from pyinstrument import Profiler
    except ImportError:
        return None
    profiler = Profiler(interval=0.0001, async_mode="disabled")
    profiler.start()
    loop(requests)
    profiler.stop()
    text = profiler.output_text(flat=True, flat_time="self", time="percent_of_total")
    lines = text.splitlines()
    # Drop the banner (logo, timestamps, the script's path): keep the rows.
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("Profile at")), 0)
    rows = [line for line in lines[start:] if line.strip()]
    return "\n".join(rows[:TOP])


def run(requests: int, modes: t.Sequence[str] = MODES) -> dict[str, t.Any]:
    """Profile each mode in a fresh subprocess."""
    out: dict[str, t.Any] = {}
    for mode in modes:
        done = subprocess.run(
            [sys.executable, "-m", __name__, "--mode", mode, "--requests", str(requests)],
            cwd=REPO_ROOT,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"profiling {mode} failed:\n{done.stderr[-4000:]}")
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True, choices=apps.MODES)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    print(json.dumps(_profile(args.mode, args.requests)))


if __name__ == "__main__":
    main()
