"""Load generator of the docker-compose stack: steady traffic on the demo's routes.

``python deploy/loadgen.py --base-url http://app:8000 --rps 10`` requests the
signup app's routes (sign-ups mostly, some ``/boom`` and 404s so the error
panels and alerts have something to show) at about ``--rps`` requests per
second, with a few concurrent clients, and prints a count per status every
``--report-every`` seconds. Standard library only (and ``examples/routes.py``).
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

# Run as a script (python deploy/loadgen.py): the repository root holds examples/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.routes import pick_path


def request(base_url: str, path: str, timeout: float) -> str:
    """The response status, or the kind of failure, as a short string."""
    try:
        with urllib.request.urlopen(base_url + path, timeout=timeout) as response:
            response.read()
            return str(response.status)
    except urllib.error.HTTPError as error:
        return str(error.code)
    except OSError as error:
        return type(error).__name__


def wait_until_up(base_url: str, stop: threading.Event, timeout: float) -> bool:
    """Poll /health until the app answers (it starts after this container)."""
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        if request(base_url, "/health", 2.0) == "200":
            return True
        stop.wait(1.0)
    return False


def client(
    base_url: str,
    interval: float,
    stop: threading.Event,
    counts: collections.Counter[str],
    lock: threading.Lock,
    seed: int,
) -> None:
    rng = random.Random(seed)
    while not stop.wait(interval * rng.uniform(0.5, 1.5)):
        status = request(base_url, pick_path(rng), 5.0)
        with lock:
            counts[status] += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--rps", type=float, default=10.0, help="requests per second in total")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; 0 runs until killed")
    parser.add_argument("--report-every", type=float, default=30.0, help="seconds between reports")
    args = parser.parse_args(argv)
    base_url = args.base_url.rstrip("/")

    stop = threading.Event()
    if not wait_until_up(base_url, stop, timeout=120.0):
        print(f"loadgen: {base_url}/health did not answer 200 within 120 s", flush=True)
        return 1
    print(f"loadgen: {args.rps:g} req/s on {base_url} with {args.clients} clients", flush=True)

    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    interval = args.clients / args.rps  # each client's mean pause between requests
    threads = [
        threading.Thread(
            target=client, args=(base_url, interval, stop, counts, lock, seed), daemon=True
        )
        for seed in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    next_report = time.monotonic() + args.report_every
    try:
        while not stop.wait(0.5):
            now = time.monotonic()
            if now >= next_report:
                next_report = now + args.report_every
                with lock:
                    report = dict(counts)
                    counts.clear()
                print(f"loadgen: last {args.report_every:g} s: {report}", flush=True)
            if deadline is not None and now >= deadline:
                stop.set()
    except KeyboardInterrupt:
        stop.set()
    for thread in threads:
        thread.join(timeout=10.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
