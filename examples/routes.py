"""The demo's traffic mix, shared by ``examples.demo`` and ``deploy/loadgen.py``.

Standard library only: the compose stack's load generator imports it too.
"""

from __future__ import annotations

import random

ROUTES: tuple[tuple[str, int], ...] = (
    ("/signup/{name}", 6),
    ("/async-signup/{name}", 2),
    ("/process/job-{n}", 2),
    ("/health", 1),
    ("/boom", 1),
    ("/no-such-page", 1),
)
"""(path template, weight): sign-ups mostly, some failures and 404s."""

NAMES = ("ada", "grace", "linus", "barbara", "ken", "margaret")


def pick_path(rng: random.Random | None = None) -> str:
    """One path of the mix, chosen by weight."""
    rng = rng or random.Random()
    paths = [path for path, weight in ROUTES for _ in range(weight)]
    return rng.choice(paths).format(name=rng.choice(NAMES), n=rng.randint(1, 9))
