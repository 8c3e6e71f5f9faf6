"""The benchmark suite's one entry point.

    python -m benchmarks.run            # full run, a few minutes
    python -m benchmarks.run --quick    # short run, under a minute
    python -m benchmarks.run --profile  # add cProfile/pyinstrument profiles
    python -m benchmarks.run --only per-request,per-send

Prints the machine, then one table per section, and writes everything as JSON
to ``benchmarks/results/`` (gitignored). Sections: ``per-request`` (direct
WSGI calls, every mode), ``per-send`` (blinker sends, 0/1/3/10 receivers),
``server`` (gunicorn under wrk), ``profile`` (where the time goes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing as t
from pathlib import Path

from . import machine, per_request, per_send, profiling, report, server

__all__ = ["Settings", "main"]

SECTIONS = ("per-request", "per-send", "server", "profile")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Settings:
    """How long each section runs; ``--quick`` and the flags override the full run."""

    rounds: int = 41
    requests: int = 500
    warmup: int = 2000
    send_rounds: int = 21
    send_ms: float = 30.0
    server_seconds: float = 2.0
    server_rounds: int = 9
    server_warmup: float = 1.0
    profile_requests: int = 5000


QUICK = Settings(
    rounds=11,
    requests=200,
    warmup=500,
    send_rounds=9,
    send_ms=10.0,
    server_seconds=1.0,
    server_rounds=2,
    profile_requests=1000,
)


def _parse(argv: t.Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short run (under a minute)")
    parser.add_argument("--profile", action="store_true", help="add the profile section")
    parser.add_argument(
        "--only", help=f"comma-separated sections to run, from: {', '.join(SECTIONS)}"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--load-generator",
        choices=("wrk", "python"),
        help="server section's load generator (default: wrk when installed, else python)",
    )
    for field in dataclasses.fields(Settings):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=float if field.type == "float" else int,
            help=f"override (full run: {field.default})",
        )
    return parser.parse_args(argv)


def main(argv: t.Sequence[str] | None = None) -> int:
    args = _parse(argv)
    settings = dataclasses.replace(QUICK) if args.quick else Settings()
    for field in dataclasses.fields(Settings):
        value = getattr(args, field.name)
        if value is not None:
            setattr(settings, field.name, value)
    if args.only:
        sections = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            print(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}", file=sys.stderr)
            return 2
    else:
        sections = [s for s in SECTIONS if s != "profile" or args.profile]

    started = time.monotonic()
    results: dict[str, t.Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "settings": dataclasses.asdict(settings),
        "machine": machine.describe(),
    }
    _say(f"sigtrace benchmarks ({'quick' if args.quick else 'full'} run)")
    _say(report.machine(results["machine"]))

    if "per-request" in sections:
        results["per_request"] = per_request.run(
            settings.rounds, settings.requests, settings.warmup
        )
        _say(report.per_request(results["per_request"]))
    if "per-send" in sections:
        results["per_send"] = per_send.run(settings.send_rounds, settings.send_ms)
        _say(report.per_send(results["per_send"]))
    if "server" in sections:
        results["server"] = server.run(
            settings.server_seconds,
            settings.server_rounds,
            settings.server_warmup,
            generator=args.load_generator,
        )
        _say(report.server(results["server"]))
    if "profile" in sections:
        results["profile"] = profiling.run(settings.profile_requests)
        _say(report.profile(results["profile"]))

    results["elapsed_seconds"] = round(time.monotonic() - started, 1)
    path = _write(args.results_dir, results)
    _say(f"done in {results['elapsed_seconds']:.0f} s; results: {_display(path)}")
    return 0


def _say(text: str) -> None:
    print(f"\n{text}", flush=True)


def _write(directory: Path, results: dict[str, t.Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    text = json.dumps(results, indent=2)
    path.write_text(text + "\n", encoding="utf-8")
    (directory / "latest.json").write_text(text + "\n", encoding="utf-8")
    return path


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
