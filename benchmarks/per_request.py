"""Per-request cost: the signup app in every mode, driven by direct WSGI calls.

    python -m benchmarks.per_request -o per_request.json [pyperf options]

A pyperf script: one benchmark per mode of :data:`benchmarks.apps.MODES`.
pyperf runs each benchmark in its own worker processes, so a mode is set up
(and its ``PROMETHEUS_MULTIPROC_DIR`` set) in a fresh process, at the first
call, outside the timed region. No server and no socket: one environ built
with werkzeug's ``EnvironBuilder``, copied per request, the body consumed.
"""

from __future__ import annotations

import typing as t
from collections.abc import Callable

from . import apps

WARMUP_REQUESTS = 500


def start_response(status: str, headers: t.Any, exc_info: t.Any = None) -> None:
    if status != "200 OK":
        raise RuntimeError(f"unexpected status {status}")


class Requests(apps.Timed):
    """``n`` requests to the signup app in ``mode``."""

    def __init__(self, mode: str, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self.mode = mode

    def setup(self) -> None:
        from werkzeug.test import EnvironBuilder

        built = apps.build(self.mode)
        self.app: t.Any = built.app
        self.environ = EnvironBuilder(path=apps.SIGNUP_PATH).get_environ()
        self.run(WARMUP_REQUESTS)
        built.check(WARMUP_REQUESTS)

    def run(self, n: int) -> None:
        app, environ = self.app, self.environ
        for _ in range(n):
            body = app(environ.copy(), start_response)
            for _chunk in body:
                pass
            body.close()


def main() -> None:
    runner, clock = apps.make_runner("benchmarks.per_request")
    for mode in apps.MODES:
        runner.bench_time_func(f"request {mode}", Requests(mode, clock))


if __name__ == "__main__":
    main()
