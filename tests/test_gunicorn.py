"""Real gunicorn under ``PROMETHEUS_MULTIPROC_DIR``: exact totals in every scrape.

Each test starts gunicorn (sync, gthread, ``--preload``, ``max_requests``
recycling, SIGKILL of a worker, HUP reload) with a ``gunicorn.conf.py`` that
imports sigtrace's hooks as the README tells users to, drives HTTP load and
reads the totals back from real scrapes: the worker route ``/metrics`` (either
worker) and the master's ``SIGTRACE_METRICS_PORT`` server. A request's values
reach a scrape within the publish interval (1 s): the tests poll for them,
bounded by :data:`tests.servers.PUBLISH_DEADLINE`.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest

from sigtrace import multiprocess_directory as mpd
from tests.servers import (
    BOOT_SENDS,
    HTTP_TIMEOUT,
    LIVE_WORKERS,
    PUBLISH_DEADLINE,
    TOTALS,
    Server,
    bucket_exemplars,
    run_until,
    start_gunicorn,
)

pytest.importorskip("gunicorn", reason="gunicorn is a dev dependency: pip install -e '.[dev]'")
if sys.platform == "win32":  # pragma: no cover
    pytest.skip("gunicorn does not run on Windows", allow_module_level=True)


def test_sync_workers_every_scrape_totals_every_request(
    tmp_path: Path, servers: list[Server]
) -> None:
    gunicorn = start_gunicorn(tmp_path, metrics_port=True)
    servers.append(gunicorn)
    n = 200
    pids = gunicorn.load(n)
    by_worker = {pid: pids.count(pid) for pid in set(pids)}
    assert len(by_worker) == 2 and all(count < n for count in by_worker.values()), by_worker

    # Within an interval every worker's values are published; then each
    # scrape (landing on either worker, or on the master's port) sees all.
    gunicorn.wait_for_totals(n)
    gunicorn.wait_for_totals(n, gunicorn.metrics_port)
    for _ in range(6):
        assert gunicorn.totals() == [n] * len(TOTALS)
    samples = gunicorn.scrape(gunicorn.metrics_port)
    assert samples[BOOT_SENDS] == 2  # each worker imported the app once
    assert samples[LIVE_WORKERS] == 2  # the app's own prometheus-client gauge, merged too
    # Scrapes are not requests: /metrics is never timed.
    assert not any(("endpoint", "sigtrace_metrics") in labels for _, labels in samples)
    # One file per worker; no archive yet (no worker died).
    files = gunicorn.files()
    assert len([f for f in files if f.startswith("sigtrace-") and f.endswith(".json")]) == 2


def test_gthread_workers(tmp_path: Path, servers: list[Server]) -> None:
    gunicorn = start_gunicorn(tmp_path, conf='worker_class = "gthread"\nthreads = 4\n')
    servers.append(gunicorn)
    gunicorn.load(300, threads=12)
    gunicorn.wait_for_totals(300)


def test_preload_counts_the_master_s_import_once(tmp_path: Path, servers: list[Server]) -> None:
    gunicorn = start_gunicorn(tmp_path, args=["--preload"], metrics_port=True)
    servers.append(gunicorn)
    pids = gunicorn.load(150)
    assert len(set(pids)) == 2
    gunicorn.wait_for_totals(150)
    gunicorn.wait_for_totals(150, gunicorn.metrics_port)
    # The app was imported once, in the master, which published that send
    # before forking; the workers inherited it reset to zero.
    assert gunicorn.scrape()[BOOT_SENDS] == 1


def test_max_requests_recycling_loses_nothing_and_archives(
    tmp_path: Path, servers: list[Server]
) -> None:
    gunicorn = start_gunicorn(tmp_path, conf="max_requests = 15\nmax_requests_jitter = 0\n")
    servers.append(gunicorn)
    n = 150
    pids = gunicorn.load(n, threads=4)
    assert len(set(pids)) >= 6  # about 10 workers served, one after another
    gunicorn.wait_for_totals(n)
    # Dead workers' files were archived (child_exit, or a scrape): the archive,
    # the lock, and at most the two live workers' files remain.
    sigtrace_files = {f for f in gunicorn.files() if f.startswith("sigtrace")}
    assert {mpd.ARCHIVE_NAME, mpd.LOCK_NAME} <= sigtrace_files
    assert len(sigtrace_files) <= 4, sigtrace_files
    gunicorn.stop()  # graceful: the last workers publish at exit
    assert gunicorn.directory_totals() == [n] * len(TOTALS)


def test_hup_reload_loses_nothing(tmp_path: Path, servers: list[Server]) -> None:
    gunicorn = start_gunicorn(tmp_path)
    servers.append(gunicorn)
    old = set(gunicorn.load(100))
    gunicorn.signal_master(signal.SIGHUP)  # new workers; the old ones exit gracefully
    gunicorn.wait_for_log(r"Booting worker with pid: \d+", count=4)
    for pid in old:
        gunicorn.wait_for_log(rf"Worker exiting \(pid: {pid}\)")
    new = gunicorn.load(100, prefix="after")
    assert not set(new) & old
    gunicorn.wait_for_totals(200)


def test_sigkill_of_a_worker_loses_at_most_one_interval(
    tmp_path: Path, servers: list[Server]
) -> None:
    """What is checked: scrapes taken throughout never go back; after the kill
    the total is at most the requests answered (plus the one cut off) and at
    least those answered minus the victim's answers of the last interval
    (0.5 s here) and two seconds of scheduling slack before the kill; the victim's
    file is added into the archive."""
    interval = 0.5
    gunicorn = start_gunicorn(tmp_path, SIGTRACE_PUBLISH_INTERVAL=str(interval))
    servers.append(gunicorn)
    lock = threading.Lock()
    ok: list[tuple[int, float]] = []  # (pid, time answered) of each successful request
    failed: list[BaseException] = []
    history: list[list[float]] = []
    stop = threading.Event()

    def client(prefix: str) -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            try:
                pid = gunicorn.signup(f"{prefix}-{i}")["pid"]
            except Exception as exc:  # the killed worker's request in flight
                with lock:
                    failed.append(exc)
                continue
            with lock:
                ok.append((pid, time.monotonic()))

    def scraper() -> None:
        while not stop.is_set():
            try:
                history.append(gunicorn.totals())
            except Exception:
                continue  # served by the worker being killed
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(f"c{i}",)) for i in range(4)]
    threads.append(threading.Thread(target=scraper))
    for thread in threads:
        thread.start()
    try:
        run_until(lambda: len({p for p, _ in ok}) == 2 and len(ok) >= 100, "both workers")
        workers = {p for p, _ in ok}
        victim = min(workers)
        # a worker that never published has no file to archive (a late-booted
        # worker's first request can come just before the kill)
        run_until(
            lambda: any(f.startswith(f"sigtrace-{victim}-") for f in gunicorn.files()),
            "the victim's first publish",
        )
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        run_until(lambda: len({p for p, _ in ok} - workers) >= 1, "a replacement", timeout=25)
        mark = len(ok)
        # and scrapes enough to check they never go down (slow ones on a loaded machine)
        run_until(lambda: len(ok) >= mark + 100 and len(history) >= 10, "traffic and scrapes")
    finally:
        stop.set()
        for thread in threads:
            thread.join(HTTP_TIMEOUT + 5)
    assert not any(thread.is_alive() for thread in threads)

    successes = len(ok)
    at_risk = sum(1 for p, at in ok if p == victim and at >= killed_at - interval - 2.0)
    assert len(failed) <= 1, failed  # a sync worker serves one request at a time

    def settled() -> bool:
        final = gunicorn.totals()
        assert all(v <= successes + len(failed) for v in final), (final, successes)
        return all(v >= successes - at_risk for v in final)

    run_until(settled, "the survivors' values", 10)
    final = gunicorn.totals()
    assert len(history) >= 10
    for earlier, later in itertools.pairwise([*history, final]):
        assert all(a <= b for a, b in zip(earlier, later, strict=True)), (earlier, later)
    gunicorn.wait_for_log(rf"Worker \(pid:{victim}\) was sent SIGKILL")
    assert not any(f.startswith(f"sigtrace-{victim}-") for f in gunicorn.files())
    assert mpd.ARCHIVE_NAME in gunicorn.files()
    assert gunicorn.scrape()[LIVE_WORKERS] == 2  # child_exit forgot the victim's gauge


def test_exemplars_across_workers_in_one_openmetrics_scrape(
    tmp_path: Path, servers: list[Server]
) -> None:
    """Per bucket the exemplar is the freshest across workers: the last request
    (sequential, so it is the newest observation in its bucket) is always one,
    whichever worker served it. Once one worker's is seen, another request
    holds a worker while the next one is sent: an idle sync worker that just
    answered tends to take the next request too, so without it all could land
    on one worker."""
    gunicorn = start_gunicorn(tmp_path, SIGTRACE_TRACING="true", SIGTRACE_CONSOLE_SPANS="true")
    servers.append(gunicorn)
    answered: list[dict[str, t.Any]] = []
    workers_of_last: set[int] = set()
    family = "sigtrace_http_request_duration_seconds"
    for round_ in range(40):
        mark = tmp_path / f"holding-{round_}"
        holding = threading.Thread(target=gunicorn.get, args=(f"/hold/0.5?mark={mark}",))
        if workers_of_last:
            holding.start()
            run_until(mark.exists, "a worker holding a request", 10)
        answered.append(gunicorn.signup(f"ex{round_}"))
        if holding.is_alive():
            holding.join()
        last = answered[-1]
        if last["pid"] in workers_of_last:
            continue  # wait for a last request served by the other worker
        assert last["trace_id"] is not None
        gunicorn.wait_for_totals(len(answered))
        trace_ids = {a["trace_id"] for a in answered}
        wait_for_exemplar(gunicorn, family, last["trace_id"], trace_ids)
        workers_of_last.add(last["pid"])
        if len(workers_of_last) == 2:
            break
    assert len(workers_of_last) == 2, answered
    receivers = bucket_exemplars(
        gunicorn.scrape_text(openmetrics=True), "sigtrace_receiver_duration_seconds"
    )  # only the signup route sends
    assert receivers and all(trace_id in trace_ids for _, trace_id in receivers)


def wait_for_exemplar(gunicorn: Server, family: str, trace_id: str, known: set[str]) -> None:
    """Poll OpenMetrics scrapes until ``trace_id`` is an exemplar of ``family``'s
    signup series; every exemplar seen must be one of ``known``. A snapshot
    may catch an observation's count a moment before its exemplar; the next
    publish (within the interval) carries both."""
    seen: list[list[tuple[str, str]]] = []

    def found() -> bool:
        exemplars = bucket_exemplars(
            gunicorn.scrape_text(openmetrics=True), family, endpoint="signup"
        )
        seen.append(exemplars)
        assert exemplars and all(t in known for _, t in exemplars), exemplars
        return trace_id in {t for _, t in exemplars}

    try:
        run_until(found, f"exemplar {trace_id}", PUBLISH_DEADLINE)
    except AssertionError as error:
        raise AssertionError(f"{error}; last scrape {seen[-1:]}") from None


class _Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str, *args: object) -> None:
        self.warnings.append(message % args)

    def info(self, message: str, *args: object) -> None:
        raise AssertionError("no server expected: " + message % args)


class _Arbiter:
    def __init__(self) -> None:
        self.log = _Log()


@pytest.mark.parametrize(
    ("env", "warning"),
    [
        ({"SIGTRACE_METRICS_PORT": "0", "PROMETHEUS_MULTIPROC_DIR": "."}, "fixed port"),
        ({"SIGTRACE_METRICS_PORT": "9999"}, "needs PROMETHEUS_MULTIPROC_DIR"),
        ({"PROMETHEUS_MULTIPROC_DIR": "."}, None),
    ],
)
def test_when_ready_starts_no_server_it_cannot_use(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], warning: str | None
) -> None:
    from sigtrace.gunicorn import when_ready

    for key in ("SIGTRACE_METRICS_PORT", "PROMETHEUS_MULTIPROC_DIR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    arbiter = _Arbiter()
    when_ready(arbiter)
    if warning is None:
        assert arbiter.log.warnings == []
    else:
        assert len(arbiter.log.warnings) == 1 and warning in arbiter.log.warnings[0]
