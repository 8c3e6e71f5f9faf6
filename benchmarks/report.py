"""Plain-text tables of the results (the JSON under benchmarks/results/ has everything)."""

from __future__ import annotations

import typing as t

from .per_send import RECEIVER_COUNTS

__all__ = ["machine", "per_request", "per_send", "profile", "server"]


def _num(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> str:
    """Columns aligned right (figures) except those in ``left`` (names)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header, *rows]):
        cells = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine(info: dict[str, t.Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v is not None)
    load = info.get("load_average")
    return "\n".join(
        [
            f"machine:  {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
            f"{info['platform']}",
            f"python:   {info['python']}",
            "sigtrace: histograms in "
            + ("C (sigtrace._speedups)" if info.get("sigtrace_c_histogram") else "pure Python"),
            f"packages: {packages}",
            f"wrk:      {info['wrk'] or 'not installed'}",
            f"commit:   {info['commit'] or 'unknown'} (uncommitted changes are measured too)",
            f"load avg at start: {', '.join(f'{x:.2f}' for x in load) if load else '-'}",
        ]
    )


def per_request(result: dict[str, t.Any]) -> str:
    head = (
        f"Per request: direct WSGI calls, GET /signup/<name> (1 custom signal, 3 receivers); "
        f"{result['rounds']} rounds x {result['requests_per_round']} requests, "
        f"median of per-round means; overheads are medians of per-round differences "
        f"to bare.\ntypical = median single request, cpu = process CPU "
        f"time per request (all threads): both less disturbed by other load"
    )
    rows = []
    bare = result["modes"].get("bare", {}).get("median_us")
    for mode, e in result["modes"].items():
        rows.append(
            [
                mode,
                _num(e["median_us"]),
                _num(e["min_us"]),
                _num(e["max_us"]),
                _num(e["typical_us"]),
                _num(e["cpu_median_us"]),
                _num(e["overhead_us"], "+.1f"),
                _num(e["typical_overhead_us"], "+.1f"),
                _num(e["cpu_median_overhead_us"], "+.1f"),
                _num(e["median_us"] / bare if bare else None, ".2f") + "x",
                _num(e["spans_per_request"], ".2f"),
                _num(e["recorded_per_request"], ".2f"),
                _num(e["receivers_per_request"], ".2f"),
            ]
        )
    table = _table(
        [
            "mode", "us/req", "min", "max", "typical", "cpu", "overhead", "typ. ovh",
            "cpu ovh", "vs bare", "spans/req", "req metric/req", "recv metric/req",
        ],
        rows,
    )  # fmt: skip
    ratio_rows = [
        [
            r["name"],
            _num(r["value"], ".2f"),
            _num(r["typical_value"], ".2f"),
            _num(r["cpu_value"], ".2f"),
            "-" if r["target"] is None else f"<= {r['target']}",
            {True: "meets", False: "MISSES", None: ""}[r["meets"]],
        ]
        for r in result["ratios"]
    ]
    ratios = _table(
        ["ratio of per-request overheads", "median", "typical", "cpu", "target", ""],
        ratio_rows,
        (0, 5),
    )
    return f"{head}\n\n{table}\n\n{ratios}"


def per_send(result: dict[str, t.Any]) -> str:
    head = (
        f"Per send: Signal.send with N trivial receivers; {result['rounds']} rounds of "
        f"~{result['target_ms']:g} ms each; median us per send (median over rounds of "
        "the ratio to the same round's bare send)"
    )
    modes = result["modes"]
    parts = [head]
    for title, stat, ratio_key in (
        ("wall clock, mean", "median_us", "ratio_to_bare"),
        ("typical (median batch)", "typical_us", "typical_ratio_to_bare"),
        ("process CPU time", "cpu_median_us", "cpu_ratio_to_bare"),
    ):
        rows = []
        for mode, e in modes.items():
            cells = [mode]
            for c in RECEIVER_COUNTS:
                entry = e[str(c)]
                cells.append(f"{entry[stat]:.2f} ({_num(entry.get(ratio_key), '.2f')}x)")
            cells.append(_num(e["spans_exported_fraction"], ".2f"))
            rows.append(cells)
        header = [title, *[f"{c} receivers" for c in RECEIVER_COUNTS], "spans exported/expected"]
        parts.append(_table(header, rows))
    checks = [
        ("no receivers, metrics only", "sigtrace-metrics", 0),
        ("no receivers, unsampled parent", "sigtrace-unsampled", 0),
        *[(f"unsampled parent, {c} receivers", "sigtrace-unsampled", c) for c in (1, 3, 10)],
        *[
            (f"unsampled, {c} receivers, pure Python", "sigtrace-unsampled-py", c)
            for c in (1, 3, 10)
        ],
    ]
    check_rows = []
    for label, mode, count in checks:
        entry = modes.get(mode, {}).get(str(count), {})
        ratio, cpu_ratio = entry.get("ratio_to_bare"), entry.get("cpu_ratio_to_bare")
        if ratio is None:
            continue
        # The targets are for sigtrace as built; the fallback's rows only inform.
        fallback = mode.endswith("-py")
        check_rows.append(
            [
                label,
                f"{ratio:.2f}x",
                f"{_num(entry.get('typical_ratio_to_bare'), '.2f')}x",
                f"{_num(cpu_ratio, '.2f')}x",
                "-" if fallback else "<= 1.5x",
                "(fallback)" if fallback else "meets" if ratio <= 1.5 else "MISSES",
            ]
        )
    header = ["ratio to bare send", "median", "typical", "cpu", "target", ""]
    parts.append(_table(header, check_rows, (0, 5)))
    return "\n\n".join(parts)


def server(result: dict[str, t.Any]) -> str:
    head = (
        f"Real server: {result['server']}; load: {result['generator']} with "
        f"{result['connections']} keep-alive connections, {result['seconds']:g} s x "
        f"{result['rounds']} rounds (interleaved); median requests/second, and the "
        f"gunicorn workers' CPU time per request (steadier on a busy machine)"
    )
    rows = [
        [
            mode,
            f"{e['median_rps']:.0f}",
            " ".join(f"{x:.0f}" for x in e["rounds_rps"]),
            _num(e.get("ratio_to_bare"), ".2f") + "x",
            _num(e.get("cpu_us_per_request"), ".0f"),
            _num(e.get("cpu_ratio_to_bare"), ".2f") + "x",
            str(e["errors"]),
        ]
        for mode, e in result["modes"].items()
    ]
    header = ["mode", "req/s", "rounds", "vs bare", "worker cpu us/req", "vs bare", "errors"]
    return head + "\n\n" + _table(header, rows)


def profile(result: dict[str, t.Any]) -> str:
    parts = [
        "Profiles (cProfile own time per request; profiling inflates every call, "
        "read shares, not absolute figures)"
    ]
    package_names: list[str] = []
    for e in result.values():
        for name in e["per_package_us"]:
            if name not in package_names:
                package_names.append(name)

    def cell(e: dict[str, t.Any], name: str) -> str:
        us = e["per_package_us"].get(name)
        if us is None:
            return "-"
        return f"{us:.1f} ({100 * us / e['profiled_us_per_request']:.0f}%)"

    rows = [[name, *[cell(e, name) for e in result.values()]] for name in package_names]
    rows.append(["total", *[_num(e["profiled_us_per_request"], ".1f") for e in result.values()]])
    parts.append(_table(["own time us/req by package (share)", *result.keys()], rows))
    for mode, e in result.items():
        if mode == "bare":
            continue
        top = [
            [
                f"{r['tottime_us_per_request']:.2f}",
                f"{r['cumtime_us_per_request']:.2f}",
                f"{r['calls_per_request']:.1f}",
                r["function"],
            ]
            for r in e["top"]
        ]
        parts.append(
            f"{mode}: top functions by own time ({e['requests']} requests)\n"
            + _table(["tottime us/req", "cumtime us/req", "calls/req", "function"], top, (3,))
        )
        if e.get("pyinstrument"):
            parts.append(f"{mode}: pyinstrument, flat, self time\n{e['pyinstrument']}")
    return "\n\n".join(parts)
