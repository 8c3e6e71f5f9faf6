"""``python -m benchmarks.run [--quick | --smoke] [--only ...]``: the pyperf scripts and
the real-server run, as markdown tables and ``summary.md`` (see docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import typing as t
from importlib import metadata
from pathlib import Path

import pyperf  # type: ignore[import-untyped]

from . import apps, per_send, server

REPO_ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("per-send", "per-request", "server")
# Per speed: passes, and pyperf's options for each. Every pass runs every benchmark
# and appends to the same file, so each mode's values come from the whole run, not
# from the minutes it happened to run in (the load on a shared machine drifts).
PYPERF = {
    "full": (4, ["--processes", "3", "--values", "3"]),
    "quick": (1, ["--processes", "1", "--values", "3", "--min-time", "0.05"]),
    "smoke": (1, ["--debug-single-value"]),  # one value per benchmark: it runs, no more
}
SERVER = {"full": (5.0, 3), "quick": (2.0, 1), "smoke": (1.0, 1)}  # seconds, rounds
PACKAGES = "flask blinker opentelemetry-sdk prometheus-client prometheus-flask-exporter gunicorn"

Stats = tuple[float, float, float, float]  # mean, std, median, standard error (seconds)


def _stats(suite: pyperf.BenchmarkSuite, name: str) -> Stats:
    bench = suite.get_benchmark(name)
    n = len(bench.get_values())
    std = bench.stdev() if n > 1 else 0.0
    return bench.mean(), std, bench.median(), std / math.sqrt(n)


def _us(x: float, like: float | None = None) -> str:
    """µs, with 1 decimal from 10 µs on (2 below), or as many as ``like`` gets."""
    return f"{x * 1e6:.{1 if abs(like if like is not None else x) >= 1e-5 else 2}f}"


def _pm(s: Stats) -> str:
    return f"{_us(s[0])} ± {_us(s[1], s[0])}"


def _md(header: str, rows: t.Iterable[t.Sequence[t.Any]]) -> list[str]:
    """A markdown table: ``header`` is "a|b|c"; columns after the first are right-aligned."""
    n = header.count("|")
    lines = [f"| {header.replace('|', ' | ')} |", "| --- |" + " ---: |" * n]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _ratio(label: str, top: Stats, bottom: Stats, target: float | None) -> list[str]:
    mean = top[0] / bottom[0]
    verdict = "" if target is None else (" ✓" if mean <= target else " ✗")
    if abs(top[0]) < 2 * top[3] or abs(bottom[0]) < 2 * bottom[3]:
        verdict = " (noise)"  # an overhead within two standard errors of zero
    goal = "-" if target is None else f"≤ {target}"
    return [label, f"**{mean:.2f}**{verdict}", f"{top[2] / bottom[2]:.2f}", goal]


def per_request_table(suite: pyperf.BenchmarkSuite) -> str:
    s = {mode: _stats(suite, f"request {mode}") for mode in apps.MODES}
    # Overheads over bare: difference of means (and of medians); the std as for
    # the difference of two independent values.
    b = s["bare"]
    o = {m: (v[0] - b[0], math.hypot(v[1], b[1]), v[2] - b[2], math.hypot(v[3], b[3]))
         for m, v in s.items()}  # fmt: skip
    over = {m: f"{v[0] * 1e6:+.1f} ± {v[1] * 1e6:.1f}" for m, v in o.items()}
    rows = [(f"`{m}`: {what}", _pm(s[m]), _us(s[m][2]), "-" if m == "bare" else over[m])
            for m, what in apps.MODES.items()]  # fmt: skip
    ratios = [
        _ratio("sigtrace metrics-only / pfe", o["sigtrace-metrics"], o["pfe"], 0.25),
        _ratio("the same, multiprocess", o["sigtrace-metrics-mp"], o["pfe-mp"], 0.25),
        _ratio("sigtrace multiprocess / one process, metrics only",
               o["sigtrace-metrics-mp"], o["sigtrace-metrics"], 1.5),
        _ratio("the same, metrics and spans", o["sigtrace-full-mp"], o["sigtrace-full"], 1.5),
        _ratio("sigtrace full / floor", o["sigtrace-full"], o["floor"], 1.1),
        _ratio("sigtrace full / otel+pfe", o["sigtrace-full"], o["otel+pfe"], None),
        _ratio("sigtrace slow / full", o["sigtrace-slow"], o["sigtrace-full"], 0.3),
        _ratio("sigtrace none (the request span) / full", o["sigtrace-none"], o["sigtrace-full"],
               None),
    ]  # fmt: skip
    table = _md("mode|µs/request, mean ± std|median|overhead over bare, µs", rows)
    return "\n".join([*table, "", *_md("overhead ratio|from means|from medians|target", ratios)])


def per_send_table(suite: pyperf.BenchmarkSuite) -> str:
    rows = []
    for mode, receivers in per_send.BENCHMARKS[len(per_send.RECEIVER_COUNTS) :]:
        bare, traced = (_stats(suite, f"send {m} {receivers}") for m in ("bare", mode))
        label = f"{receivers}, {mode.removeprefix('sigtrace-')}"
        rows.append([label, _pm(bare), _pm(traced), *_ratio("", traced, bare, 1.5)[1:]])
    header = "receivers, sigtrace mode|bare blinker, µs|sigtrace, µs|ratio (means)|(medians)|target"
    return "\n".join(_md(header, rows))


def server_table(result: dict[str, t.Any]) -> str:
    bare = result["modes"]["bare"]["median_cpu_us"]

    def versus(mode: str, cpu: float) -> str:
        target = server.TARGETS.get(mode)
        mark = "" if target is None else (" ✓" if cpu / bare <= target else " ✗")
        return f"{cpu / bare:.2f}{mark}" + ("" if target is None else f" (≤ {target})")

    rows = [(f"`{m}`", f"{e['median_rps']:.0f}", f"{e['median_cpu_us']:.0f}",
             versus(m, e["median_cpu_us"]), e["errors"], e["counted_by_metrics"] or "-")
            for m, e in result["modes"].items()]  # fmt: skip
    head = "mode|req/s (median)|worker CPU µs/request|CPU vs bare|errors|counted by /metrics"
    intro = f"load: {result['generator']}, {result['connections']} connections, "
    intro += f"{result['rounds']} x {result['seconds']:.0f} s per mode, interleaved\n\n"
    return intro + "\n".join(_md(head, rows))


def machine() -> str:
    """The commit, the CPU, the versions measured and the load, for the summary's head."""
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    info = Path("/proc/cpuinfo")
    models = re.findall(r"^model name\s*:\s*(.+)$", info.read_text() if info.exists() else "", re.M)
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in PACKAGES.split())
    python = f"{platform.python_implementation()} {platform.python_version()}"
    cpu = f"{models[0] if models else platform.machine()}, {os.cpu_count()} cores"
    return f"commit {commit or '?'}; {cpu}, {python}; {versions}; load average {_load()}"


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _pyperf(module: str, out: Path, speed: str) -> pyperf.BenchmarkSuite:
    out.unlink(missing_ok=True)
    passes, options = PYPERF[speed]
    command = [sys.executable, "-m", f"benchmarks.{module}", *options]
    for _ in range(passes):
        subprocess.run([*command, "--quiet", "--append", str(out)], cwd=REPO_ROOT, check=True)
    return pyperf.BenchmarkSuite.load(str(out))


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser("python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 pass, 1 process x 3 values each")
    parser.add_argument("--smoke", action="store_true", help="1 value per benchmark (the test)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"from {', '.join(SECTIONS)}")
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "benchmarks/results")
    parser.add_argument(
        "--server-workers", type=int, default=2, help="gunicorn's sync workers (default 2)"
    )
    args = parser.parse_args(argv)
    speed = "smoke" if args.smoke else "quick" if args.quick else "full"
    if set(sections := args.only.split(",")) - set(SECTIONS):
        parser.error(f"--only: choose from {', '.join(SECTIONS)}")
    results, started = args.results_dir, time.monotonic()
    results.mkdir(parents=True, exist_ok=True)
    out = [f"# sigtrace benchmarks ({speed} run, CPU clock)", "", machine()]
    print("\n".join(out), flush=True)

    def section(title: str, table: str) -> None:
        out.extend(["", f"## {title}", "", table])
        print(f"\n## {title}\n\n{table}", flush=True)

    if "per-send" in sections:
        suite = _pyperf("per_send", results / "per_send.json", speed)
        section("Per send (unsampled: under an unsampled parent span)", per_send_table(suite))
    if "per-request" in sections:
        suite = _pyperf("per_request", results / "per_request.json", speed)
        section("Per request (direct WSGI calls)", per_request_table(suite))
    if "server" in sections:
        result = server.run(*SERVER[speed], workers=args.server_workers)
        (results / "server.json").write_text(json.dumps(result, indent=1))
        workers = f"{args.server_workers} sync worker{'s' if args.server_workers > 1 else ''}"
        section(f"Real server (gunicorn, {workers}, multiprocess)", server_table(result))
    out += ["", f"done in {time.monotonic() - started:.0f} s; load average at the end {_load()}"]
    print(out[-1])
    (results / "summary.md").write_text("\n".join(out) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
