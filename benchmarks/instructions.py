"""Instruction counts per request, under valgrind's callgrind: the figures that do not move
with the machine's load (see docs/benchmarks.md).

``python -m benchmarks.instructions [MODE ...] [--short N] [--long N]`` runs each mode of
:data:`benchmarks.apps.MODES` (default: bare, the sigtrace modes one process) twice under
``valgrind --tool=callgrind``, for ``--short`` and ``--long`` requests, and prints the
difference divided by the difference in requests: start-up and warm-up cancel out.
All threads are counted (the span processor's and the tally thread's too).
``python -m benchmarks.instructions --requests MODE N`` is what valgrind runs.

``--server`` counts a gunicorn worker's instead, for the modes of
:data:`benchmarks.server.MODES` (default: bare and the sigtrace ones): gunicorn
as ``server.py`` runs it, with one sync worker so that it answers every
request, started under valgrind, sent ``--short`` then (in a second run)
``--long`` requests one at a time over HTTP on 127.0.0.1, then stopped; the
worker's own count (accepting, parsing and answering included) is compared.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import typing as t
from pathlib import Path

from . import apps, server

DEFAULT_MODES = ("bare", "sigtrace-metrics", "sigtrace-none", "sigtrace-slow", "sigtrace-full")
SERVER_MODES = tuple(m for m in server.MODES if m == "bare" or m.startswith("sigtrace"))
# Fair scheduling: the span processor's export thread gets its turn, as it does
# outside valgrind (else its queue may fill, and spans dropped would cost less).
_VALGRIND = ("valgrind", "--tool=callgrind", "--fair-sched=yes")
_TOTALS = re.compile(r"^(?:summary|totals): (\d+)", re.MULTILINE)


def _requests(mode: str, n: int) -> None:
    """``n`` requests to ``mode``'s app, after the pyperf script's warm-up and check."""
    from . import per_request

    per_request.requests(mode)(n)


def count(mode: str, requests: int) -> int:
    """Instructions (all threads) of a process making ``requests`` requests to ``mode``."""
    with tempfile.TemporaryDirectory(prefix="sigtrace-callgrind-") as tmp:
        out = Path(tmp, "callgrind.out")
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        command = [
            *_VALGRIND, f"--callgrind-out-file={out}", "--combine-dumps=yes",
            sys.executable, "-m", "benchmarks.instructions", "--requests", mode, str(requests),
        ]  # fmt: skip
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=1800)
        return _total(out, mode)


def _total(out: Path, what: str) -> int:
    """The instruction count in callgrind's output file ``out``."""
    totals = [int(n) for n in _TOTALS.findall(out.read_text(errors="replace"))]
    if not totals:
        raise RuntimeError(f"no totals in callgrind's output for {what}")
    return max(totals)


def per_request(mode: str, short: int, long: int) -> float:
    return (count(mode, long) - count(mode, short)) / (long - short)


def count_server(mode: str, requests: int) -> int:
    """Instructions (all threads) of one gunicorn sync worker serving ``mode``, started
    under valgrind and stopped after ``requests`` requests (after one that waits for it)."""
    with tempfile.TemporaryDirectory(prefix="sigtrace-callgrind-") as tmp:
        prefix = [*_VALGRIND, f"--callgrind-out-file={tmp}/callgrind.out.%p"]
        gunicorn = server.Gunicorn(mode, prefix=prefix, workers=1)
        try:
            gunicorn.wait_ready(timeout=600)
            (worker,) = gunicorn.worker_pids()
            url = gunicorn.url + apps.SIGNUP_PATH
            for _ in range(requests):
                with server._OPEN(url, timeout=120) as response:
                    response.read()
        finally:
            gunicorn.stop(timeout=300)  # the worker exits, and valgrind writes its count
        return _total(Path(tmp, f"callgrind.out.{worker}"), f"{mode}'s worker")


def server_per_request(mode: str, short: int, long: int) -> float:
    return (count_server(mode, long) - count_server(mode, short)) / (long - short)


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser("python -m benchmarks.instructions", description=__doc__)
    parser.add_argument("modes", nargs="*", help="modes of benchmarks.apps (or .server)")
    parser.add_argument("--server", action="store_true", help="a gunicorn worker's, per request")
    parser.add_argument("--short", type=int, default=100, help="requests of the short run")
    parser.add_argument("--long", type=int, default=2100, help="requests of the long run")
    parser.add_argument("--requests", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests:
        _requests(args.requests[0], int(args.requests[1]))
        return 0
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    known = server.MODES if args.server else apps.MODES
    modes = args.modes or (SERVER_MODES if args.server else DEFAULT_MODES)
    unknown = [m for m in modes if m not in known]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(known)}")
    measure = server_per_request if args.server else per_request
    counts = {}
    for mode in modes:
        counts[mode] = measure(mode, args.short, args.long)
        print(f"{mode}: {counts[mode]:,.0f} instructions per request", flush=True)
    bare = counts.get("bare")
    if bare is not None:
        print("\n" + table(counts, bare, args.server))
    full = counts.get("sigtrace-full")
    for mode in ("sigtrace-slow", "sigtrace-none"):
        if bare is not None and full is not None and mode in counts:
            ratio = (counts[mode] - bare) / (full - bare)
            print(f"\n{mode} / sigtrace-full overhead: {ratio:.3f}")
    return 0


def table(counts: dict[str, float], bare: float, per_worker: bool) -> str:
    """Markdown: per mode, instructions per request and the overhead over bare (and for a
    worker, the ratio to bare's, against its target)."""
    if not per_worker:
        rows = [f"| `{m}` | {n:,.0f} | {'-' if m == 'bare' else f'{n - bare:+,.0f}'} |"
                for m, n in counts.items()]  # fmt: skip
        return "\n".join(["| mode | instructions per request | overhead over bare |",
                          "| --- | ---: | ---: |", *rows])  # fmt: skip
    lines = ["| mode | worker instructions per request | over bare | vs bare |",
             "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for mode, n in counts.items():
        target = server.TARGETS.get(mode)
        ratio = f"{n / bare:.3f}" + (
            "" if target is None else f" {'✓' if n / bare <= target else '✗'} (≤ {target})"
        )
        lines.append(f"| `{mode}` | {n:,.0f} | {'-' if mode == 'bare' else f'{n - bare:+,.0f}'} "
                     f"| {ratio} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
