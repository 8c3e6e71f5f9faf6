"""Per request: the signup app in every mode, called as a WSGI app, no server (a pyperf
script: ``python -m benchmarks.per_request -o out.json``; see docs/benchmarks.md)."""

from __future__ import annotations

import typing as t
from collections.abc import Callable

import pyperf  # type: ignore[import-untyped]
from werkzeug.test import EnvironBuilder

from . import apps

WARMUP_REQUESTS = 500


def start_response(status: str, headers: t.Any, exc_info: t.Any = None) -> None:
    if status != "200 OK":
        raise RuntimeError(f"unexpected status {status}")


def requests(mode: str) -> Callable[[int], None]:
    """Set up ``mode`` in this worker; return ``run(n)``: ``n`` requests."""
    built = apps.build(mode)
    app: t.Any = built.app
    environ = EnvironBuilder(path=apps.SIGNUP_PATH).get_environ()

    def run(n: int) -> None:
        for _ in range(n):
            body = app(environ.copy(), start_response)
            for _chunk in body:
                pass
            body.close()

    run(WARMUP_REQUESTS)
    built.check(WARMUP_REQUESTS)
    return run


def main() -> None:
    runner = pyperf.Runner(program_args=("-m", "benchmarks.per_request"))
    for mode in apps.MODES:
        runner.bench_time_func(f"request {mode}", apps.timed(requests, mode))


if __name__ == "__main__":
    main()
