"""Per-request cost: the signup app in every mode, driven by direct WSGI calls.

No server and no socket: one environ is built once with werkzeug's
``EnvironBuilder`` and each request calls the app with a copy of it and
consumes the body, so the figures are the app's and the instrumentation's.
Each mode lives in its own worker process (see :mod:`benchmarks.worker`); the
parent runs rounds, each asking every mode (in rotating order) for the mean
of ``requests`` timed requests, and reports the median over rounds.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import typing as t
from time import perf_counter_ns, process_time_ns

from . import apps
from .worker import serve, start_all

__all__ = ["run"]


def _worker(mode: str, warmup: int) -> None:
    from werkzeug.test import EnvironBuilder

    state = apps.build(mode)
    app: t.Any = state.app  # called as a plain WSGI callable
    environ = EnvironBuilder(path=apps.SIGNUP_PATH, method="GET").get_environ()
    statuses: list[str] = []
    done = 0

    def start_response(status: str, headers: t.Any, exc_info: t.Any = None) -> None:
        statuses.append(status)

    def requests(n: int) -> list[int]:
        """Run ``n`` requests; the clock before the first and after each one."""
        clock = perf_counter_ns
        stamps = [0] * (n + 1)
        stamps[0] = clock()
        for i in range(1, n + 1):
            body = app(environ.copy(), start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
            stamps[i] = clock()
        return stamps

    requests(warmup)
    done += warmup
    if set(statuses) != {"200 OK"}:
        raise RuntimeError(f"{mode}: unexpected statuses {sorted(set(statuses))}")

    def measure(args: list[str]) -> dict[str, t.Any]:
        nonlocal done
        n = int(args[0])
        statuses.clear()
        gc.collect()
        cpu_started = process_time_ns()
        stamps = requests(n)
        cpu = process_time_ns() - cpu_started
        done += n
        if set(statuses) != {"200 OK"}:
            raise RuntimeError(f"unexpected statuses {sorted(set(statuses))}")
        # The median single request is rarely one that another process preempted.
        typical = statistics.median(b - a for a, b in itertools.pairwise(stamps))
        return {
            "us": (stamps[-1] - stamps[0]) / n / 1000,
            "typical_us": typical / 1000,
            "cpu_us": cpu / n / 1000,
        }

    def stats(args: list[str]) -> dict[str, t.Any]:
        return {
            "requests": done,
            "spans": state.spans_exported(),
            "recorded": state.requests_recorded(),
            "receivers": state.receivers_recorded(),
        }

    serve({"measure": measure, "stats": stats}, {"ready": mode})


def run(
    rounds: int, requests: int, warmup: int, modes: t.Sequence[str] = apps.MODES
) -> dict[str, t.Any]:
    """Measure every mode; return per-mode rounds, medians and sanity counts."""
    workers = start_all(__name__, modes, "--warmup", str(warmup))
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu_samples: dict[str, list[float]] = {mode: [] for mode in modes}
    typical_samples: dict[str, list[float]] = {mode: [] for mode in modes}
    checks: dict[str, dict[str, t.Any]] = {}
    try:
        order = list(modes)
        for r in range(rounds):
            # Rotate the order: no mode always runs right after the same neighbour.
            rotated = order[r % len(order) :] + order[: r % len(order)]
            for mode in rotated:
                answer = workers[mode].ask(f"measure {requests}")
                samples[mode].append(answer["us"])
                cpu_samples[mode].append(answer["cpu_us"])
                typical_samples[mode].append(answer["typical_us"])
        for mode, worker in workers.items():
            checks[mode] = worker.ask("stats")
    finally:
        for worker in workers.values():
            worker.close()
    results: dict[str, t.Any] = {}
    for mode in modes:
        done = checks[mode]["requests"]
        spans, recorded = checks[mode]["spans"], checks[mode]["recorded"]
        receivers = checks[mode]["receivers"]
        results[mode] = {
            "median_us": statistics.median(samples[mode]),
            "min_us": min(samples[mode]),
            "max_us": max(samples[mode]),
            "typical_us": statistics.median(typical_samples[mode]),
            "cpu_median_us": statistics.median(cpu_samples[mode]),
            "rounds_us": samples[mode],
            "typical_rounds_us": typical_samples[mode],
            "cpu_rounds_us": cpu_samples[mode],
            "spans_per_request": spans / done if spans is not None else None,
            "recorded_per_request": recorded / done if recorded is not None else None,
            "receivers_per_request": receivers / done if receivers is not None else None,
        }
    bare = results.get("bare")
    # Paired overheads: each round's time minus the same round's bare time,
    # measured moments apart, then the median over rounds; the machine's speed
    # drifts between rounds, and a pair mostly shares its moment.
    for entry in results.values():
        for stat, series in (
            ("median_us", "rounds_us"),
            ("typical_us", "typical_rounds_us"),
            ("cpu_median_us", "cpu_rounds_us"),
        ):
            overhead = (
                statistics.median(
                    m - b for m, b in zip(entry[series], bare[series], strict=True)
                )
                if bare is not None
                else None
            )
            entry[stat.replace("_us", "_overhead_us")] = overhead
        entry["overhead_us"] = entry["median_overhead_us"]
    return {
        "rounds": rounds,
        "requests_per_round": requests,
        "warmup": warmup,
        "modes": results,
        "ratios": ratios(results),
    }


def _ratio(results: dict[str, t.Any], top: str, bottom: str, stat: str) -> float | None:
    if top not in results or bottom not in results:
        return None
    a, b = results[top][stat], results[bottom][stat]
    if a is None or b is None:
        return None
    return a / b if b > 0 else float("inf")


def ratios(results: dict[str, t.Any]) -> list[dict[str, t.Any]]:
    """The budget ratios of DESIGN.md, each with its target.

    ``value`` uses the medians of per-round mean wall-clock time (the headline
    figure); the same ratio from the typical (median) single request and from
    CPU time are given too: they are less disturbed by other processes on a
    shared machine.
    """
    wanted = [
        ("sigtrace-metrics / pfe", "sigtrace-metrics", "pfe", 0.5),
        ("sigtrace-full / floor", "sigtrace-full", "floor", 1.25),
        ("sigtrace-full / otel+pfe", "sigtrace-full", "otel+pfe", 0.4),
        ("sigtrace-full / otel", "sigtrace-full", "otel", None),
        # The floor against the peers: the least any five-SDK-span design can reach.
        ("floor / otel+pfe", "floor", "otel+pfe", None),
    ]
    out = []
    for label, top, bottom, target in wanted:
        value = _ratio(results, top, bottom, "median_overhead_us")
        if value is None:
            continue
        out.append(
            {
                "name": f"overhead {label}",
                "value": value,
                "cpu_value": _ratio(results, top, bottom, "cpu_median_overhead_us"),
                "typical_value": _ratio(results, top, bottom, "typical_overhead_us"),
                "target": target,
                "meets": None if target is None else value <= target,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True, choices=apps.MODES)
    parser.add_argument("--warmup", type=int, default=500)
    args = parser.parse_args()
    _worker(args.worker, args.warmup)


if __name__ == "__main__":
    main()
