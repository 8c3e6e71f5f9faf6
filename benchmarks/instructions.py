"""Instruction counts per request, under valgrind's callgrind: the figures that do not move
with the machine's load (see docs/benchmarks.md).

``python -m benchmarks.instructions [MODE ...] [--short N] [--long N]`` runs each mode of
:data:`benchmarks.apps.MODES` (default: bare, the sigtrace modes one process) twice under
``valgrind --tool=callgrind``, for ``--short`` and ``--long`` requests, and prints the
difference divided by the difference in requests: start-up and warm-up cancel out.
All threads are counted (the span processor's and the tally thread's too).
``python -m benchmarks.instructions --requests MODE N`` is what valgrind runs.
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

from . import apps

DEFAULT_MODES = ("bare", "sigtrace-metrics", "sigtrace-none", "sigtrace-slow", "sigtrace-full")
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
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--combine-dumps=yes",
            sys.executable, "-m", "benchmarks.instructions", "--requests", mode, str(requests),
        ]  # fmt: skip
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=1800)
        totals = [int(n) for n in _TOTALS.findall(out.read_text(errors="replace"))]
        if not totals:
            raise RuntimeError(f"no totals in callgrind's output for {mode}")
        return max(totals)


def per_request(mode: str, short: int, long: int) -> float:
    return (count(mode, long) - count(mode, short)) / (long - short)


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser("python -m benchmarks.instructions", description=__doc__)
    parser.add_argument("modes", nargs="*", default=DEFAULT_MODES, help="modes of benchmarks.apps")
    parser.add_argument("--short", type=int, default=100, help="requests of the short run")
    parser.add_argument("--long", type=int, default=2100, help="requests of the long run")
    parser.add_argument("--requests", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests:
        _requests(args.requests[0], int(args.requests[1]))
        return 0
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    unknown = [m for m in args.modes if m not in apps.MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(apps.MODES)}")
    counts = {}
    for mode in args.modes:
        counts[mode] = per_request(mode, args.short, args.long)
        print(f"{mode}: {counts[mode]:,.0f} instructions per request", flush=True)
    bare = counts.get("bare")
    if bare is not None:
        print("\n| mode | instructions per request | overhead over bare |")
        print("| --- | ---: | ---: |")
        for mode, n in counts.items():
            print(f"| `{mode}` | {n:,.0f} | {'-' if mode == 'bare' else f'{n - bare:+,.0f}'} |")
        full = counts.get("sigtrace-full")
        for mode in ("sigtrace-slow", "sigtrace-none"):
            if full is not None and mode in counts:
                ratio = (counts[mode] - bare) / (full - bare)
                print(f"\n{mode} / sigtrace-full overhead: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
