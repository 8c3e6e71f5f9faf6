"""The pyperf runner both benchmark scripts share, with the choice of clock.

``--clock cpu`` (the default of ``python -m benchmarks.run``) times with the
process's CPU time, all threads included (the span processor's export thread
too): on a shared machine a process that waits for a core accrues none, so
the figures move much less with other load than wall-clock time does.
``--clock wall`` is pyperf's usual ``perf_counter``, right on a quiet machine.
"""

from __future__ import annotations

import time
import typing as t

import pyperf

CLOCKS: dict[str, t.Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def make_runner(module: str) -> tuple[pyperf.Runner, t.Callable[[], float]]:
    """pyperf's runner for ``python -m module``, and the clock its workers must use."""

    def pass_clock(cmd: list[str], args: t.Any) -> None:
        cmd.extend(("--clock", args.clock))

    runner = pyperf.Runner(program_args=("-m", module), add_cmdline_args=pass_clock)
    runner.argparser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    args = runner.parse_args()
    runner.metadata["clock"] = args.clock
    return runner, CLOCKS[args.clock]
